"""`datm`: the command line. Each stage command runs the very function its DVC stage runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from stages import common, launch


class _Commands(TyperGroup):
    """datm's commands. What no guarded step takes ends as `common.guarded` ends it: a Ctrl-C
    (one while a command imports its stage, or before a launch has taken the signal over) in
    one line and exit 130, where Typer alone would exit 130 without a word; a SIGTERM in one
    line and 143; a disk that refuses a write outside a stage (`repro --preset` writing
    params.yaml, `plots` its page) in one line and exit 2."""

    def invoke(self, ctx: typer.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise typer.Exit(common.guarded(_raising(exc))) from None
        except OSError as exc:
            if common.refused(exc) is None:
                raise  # a bug: its traceback
            raise typer.Exit(common.guarded(_raising(exc))) from None


def _raising(exc: BaseException):
    """A step that raises `exc`, for `common.guarded` to report as it reports its own."""
    def step() -> None:
        raise exc

    return step


app = typer.Typer(help="Dataset distillation by difficulty-aligned trajectory matching (DATM).",
                  cls=_Commands, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
RootOpt = Annotated[Path, typer.Option("--root", help="project root (data/, artifacts/)")]
PRESETS = Path(__file__).resolve().parent.parent / "presets"


def _version(show: bool) -> None:
    if show:
        from importlib import metadata

        import torch

        versions = {name: _installed(metadata, name) for name in ("torchvision", "dvc", "mlflow")}
        typer.echo(f"datm {_installed(metadata, 'datm')} (torch {torch.__version__}, "
                   + ", ".join(f"{k} {v}" for k, v in versions.items()) + ")")
        raise typer.Exit()


def _installed(metadata, name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


@app.callback()
def _started(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="print datm's version and those of torch, torchvision, dvc, mlflow")] = False) -> None:
    # guarded ends the start-up hold (cli/__init__.py): a Ctrl-C that came while datm was
    # starting is exit 130 and one line, before the command does anything
    code = common.guarded(lambda: None)
    if code:
        raise typer.Exit(code)


def _run(fn, stage: str | None = None, root: Path = Path(".")) -> None:
    """Run `fn` as `stage` by hand; afterwards warn if that changed outputs DVC tracks."""
    code = common.guarded(fn)
    if code:
        raise typer.Exit(code)
    _warn_tracked(stage, root)


def _warn_tracked(stage: str | None, root: Path) -> None:
    warning = common.dvc_tracked_warning(root, stage) if stage else None
    if warning:
        common.console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def _start(start, stage: str | None, root: Path) -> None:
    """Run a stage by hand as the processes params.yaml's launch section (or DATM_RANKS) asks
    for: `start()` runs one in this process, several as `python -m stages...` under torchrun
    (stages/launch.py); then warn as `_run` does."""
    code = start()
    if code:
        raise typer.Exit(code)
    _warn_tracked(stage, root)


@app.command("data")
def data_cmd(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Read the dataset into data/{train,test}.safetensors (stage: download)."""
    from stages import download

    _run(lambda: download.run(str(params), str(root)), "download", root)


@app.command()
def zca(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Fit ZCA whitening on the training images (stage: zca)."""
    from stages import zca as stage

    _run(lambda: stage.run(str(params), str(root)), "zca", root)


@app.command()
def buffers(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Train the expert trajectories, the full-set reference (stage: buffers).

    Resumes at the next unfinished expert. Runs as params.yaml's launch.buffers processes
    (DATM_RANKS overrides)."""
    from stages import buffers as stage

    _start(lambda: stage.start(str(params), str(root)), "buffers", root)


@app.command()
def distill(ipc: Annotated[int, typer.Option(help="images per class")],
            fresh: Annotated[bool, typer.Option(help="ignore an existing checkpoint")] = False,
            params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Distill one IPC (stage: distill@IPC).

    Resumes from its checkpoint after a kill or Ctrl-C. Runs as params.yaml's launch.distill
    processes (DATM_RANKS overrides)."""
    from stages import distill as stage

    _start(lambda: stage.start(ipc, str(params), str(root), fresh), f"distill@{ipc}", root)


@app.command()
def baseline(ipc: Annotated[int, typer.Option(help="images per class")],
             params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Train fresh networks on a random real subset of IPC images per class (stage: baseline@IPC).

    The baseline `datm evaluate --ipc` reports beside the distilled set. Runs as params.yaml's
    launch.baseline processes (DATM_RANKS overrides)."""
    from stages import evaluate as stage

    _start(lambda: stage.start("baseline", ipc, str(params), str(root)), f"baseline@{ipc}",
           root)


@app.command()
def evaluate(ipc: Annotated[int | None, typer.Option(help="evaluate this distilled IPC")] = None,
             from_: Annotated[Path | None, typer.Option(
                 "--from", help="evaluate a set from a folder: a datm export, a DATM / MTT set "
                 "(images_best.pt, labels_best.pt, lr_best.pt) or an image folder (one "
                 "subfolder per class, hard labels)")] = None,
             zca: Annotated[bool | None, typer.Option(
                 "--zca/--no-zca", help="--from: whiten the set's pixels and the test split "
                 "with the run's ZCA, or normalize them per channel (default: as the run "
                 "does)")] = None,
             lr: Annotated[float | None, typer.Option(
                 help="--from: train at this lr (default: the learned lr by the pipeline's "
                 "rule; evaluate.random_lr for hard labels)")] = None,
             record: Annotated[bool, typer.Option(
                 help="--from a datm export: write the measured accuracy into its card")] = False,
             params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Train fresh networks on a set and report its test accuracy (stage: evaluate@IPC).

    --ipc N: the distilled set of IPC N, beside its random real baseline and the full set.
    --from DIR: any set in a folder (a datm export, DATM / MTT .pt files, an image folder),
    with the recipe printed first. Both run as params.yaml's launch.evaluate processes
    (DATM_RANKS overrides)."""
    from stages import evaluate as stage

    if (ipc is None) == (from_ is None):
        common.console.print("[bold red]error:[/] pass exactly one of --ipc N or --from DIR")
        raise typer.Exit(2)
    if ipc is not None:
        if zca is not None or lr is not None or record:
            common.console.print("[bold red]error:[/] --zca, --lr and --record go with --from")
            raise typer.Exit(2)
        _start(lambda: stage.start("evaluate", ipc, str(params), str(root)), f"evaluate@{ipc}",
               root)
    else:
        from datm.pipeline.export import FromOptions
        from stages import export as from_stage

        _start(lambda: from_stage.start_from(from_, FromOptions(zca, lr), record, str(params),
                                             str(root)), None, root)


@app.command()
def crossarch(ipc: Annotated[int, typer.Option(help="images per class")],
              params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Train the distilled set on other architectures (stage: crossarch@IPC).

    The distilled set and a random real subset of the same size, each on every architecture of
    evaluate.cross_archs (the IPCs of evaluate.cross_ipcs have the stage). Runs as
    params.yaml's launch.crossarch processes."""
    from stages import evaluate as stage

    _start(lambda: stage.start("crossarch", ipc, str(params), str(root)), f"crossarch@{ipc}",
           root)


@app.command()
def decompose(ipc: Annotated[int, typer.Option(help="images per class")],
              params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Say where the IPC's gain comes from, images or labels (stage: decompose@IPC).

    Trains the distilled images with hard labels and random real images with the experts'
    soft labels, beside evaluate@IPC and baseline@IPC (the IPCs of evaluate.decompose_ipcs have
    the stage). Runs as params.yaml's launch.decompose processes."""
    from stages import decompose as stage

    _start(lambda: stage.start(ipc, str(params), str(root)), f"decompose@{ipc}", root)


@app.command()
def summary(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Accuracy vs IPC table, figures and reports/summary.md (stage: summary)."""
    from stages import summary as stage

    _run(lambda: stage.run(str(params), str(root)), "summary", root)


@app.command()
def export(ipc: Annotated[int, typer.Option(help="which distilled IPC")],
           out: Annotated[Path, typer.Option(help="output folder")],
           format: Annotated[str, typer.Option(
               "--format", "-f", help="safetensors | pt | npz (lossless: the network inputs "
               "exactly, and the unclipped pixels) | png (8 bits per image)")] = "safetensors",
           force: Annotated[bool, typer.Option(help="overwrite a non-empty --out")] = False,
           measure: Annotated[bool, typer.Option(
               help="png: train the recipe on the written PNGs and put their accuracy on the "
               "card (else it says 'not measured')")] = True,
           params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Write a distilled set to a folder, with a card and reproduce.py.

    With its soft labels, learned lr and ZCA, a dataset card (dataset_card.json and README.md:
    the recipe, and the accuracy of exactly the exported files) and reproduce.py, plain
    PyTorch that trains on it by that recipe. safetensors / pt / npz are lossless; png is 8
    bits per image, measured after writing unless --no-measure."""
    from stages import export as stage

    _run(lambda: stage.export(ipc, format, out, force, str(root), str(params)))
    if format == "png" and measure:
        _start(lambda: stage.start_from(out, record=True, params=str(params), root=str(root)),
               None, root)


def _check_replaceable(params: Path, source: Path) -> None:
    """`--preset` overwrites params.yaml: only when git can give the current one back."""
    from datm.errors import UserError

    if not params.is_file() or params.read_bytes() == source.read_bytes():
        return
    git = ["git", "-C", str(params.parent)]
    tracked = subprocess.run([*git, "ls-files", "--error-unmatch", params.name],
                             capture_output=True).returncode == 0
    changed = subprocess.run([*git, "status", "--porcelain", "--", params.name],
                             capture_output=True, text=True).stdout.strip()
    if not tracked or changed:
        why = "has uncommitted changes" if tracked else "is not committed to git"
        raise UserError(f"{params} {why}: --preset would overwrite it; commit it (or `git "
                        "stash`) first, or copy the preset by hand")


@app.command()
def init(dataset: Annotated[str, typer.Argument(
             help="an image folder (one subfolder per class, optionally under train/ and "
             "test/) or a torchvision dataset: fashion_mnist, cifar10, cifar100, tiny_imagenet")],
         folder: Annotated[Path, typer.Option("--dir", help="the new project's folder (empty)")]
         = Path("."),
         gpu: Annotated[bool | None, typer.Option(
             "--gpu/--cpu", help="size the profile for a GPU or a CPU (default: whether this "
             "machine has a CUDA GPU)")] = None) -> None:
    """Set up a datm project for your own dataset in an empty folder.

    Looks at the data, chooses and explains every setting (params.yaml), writes dvc.yaml and
    initialises git and DVC, so that `dvc repro` runs as it is (docs/OWN_DATA.md)."""
    from cli import init as project

    def go() -> None:
        data, choices = project.create(folder, dataset, gpu)
        out = common.console
        what = data.root if data.name == "imagefolder" else data.name
        out.print(f"[green]datm project[/] in {folder.resolve()} for {what}: "
                  f"{len(data.classes)} classes, {data.train_images} training images "
                  f"({min(data.per_class)}-{max(data.per_class)} per class), "
                  f"{data.channels} channel(s), {data.side} px", highlight=False)
        for note in data.notes:
            out.print(f"  {note}", highlight=False)
        for c in choices:
            out.print(f"  {c.key} = {c.value}: {c.why}", highlight=False)
        out.print("Next: `dvc repro` (or `datm repro`) there; `git add . && git commit` first "
                  "to compare experiments (`dvc exp run`). docs/OWN_DATA.md walks through it.",
                  highlight=False)

    _run(go)


@app.command()
def repro(targets: Annotated[list[str] | None, typer.Argument(help="stages, e.g. buffers")] = None,
          preset: Annotated[str | None, typer.Option(
              help="first make presets/NAME.yaml the params.yaml (git keeps the old one)")] = None,
          force: Annotated[bool, typer.Option(help="re-run even if up to date")] = False,
          root: RootOpt = Path(".")) -> None:
    """Run the pipeline with `dvc repro` (optionally on a paper preset)."""
    # absolute: it is exec'd after the chdir into --root
    dvc = os.path.abspath(shutil.which("dvc") or Path(sys.executable).with_name("dvc"))
    _run(lambda: _check_can_run(root, dvc))
    if preset:
        source = PRESETS / f"{preset}.yaml"
        if not source.is_file():
            names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml"))) or "none"
            common.console.print(f"[bold red]error:[/] no preset '{preset}' (presets: {names})")
            raise typer.Exit(2)
        # validate before touching params.yaml: its settings, and its device on this machine
        _run(lambda: common.load(str(source)).torch_device())
        _run(lambda: _check_stage_params(root, source))
        _run(lambda: _check_replaceable(root / "params.yaml", source))
        shutil.copyfile(source, root / "params.yaml")
        common.console.print(f"params.yaml is now preset '{preset}' "
                             "(`git checkout params.yaml` restores the default profile)")
    _run(lambda: _check_repro(root))
    _run(lambda: _make_summary_inputs(root))
    cmd = [dvc, "repro", *(targets or [])] + (["--force"] if force else [])
    common.console.print(f"[dim]$ {' '.join(cmd)}[/]")
    # dvc.yaml runs `python -m stages...`: make that the python datm runs in (the venv's).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # datm becomes DVC: a Ctrl-C reaches DVC and its stage once, as without datm (waiting in a
    # child, datm would kill DVC on its own KeyboardInterrupt), and DVC's exit code is datm's.
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(root)
    os.execve(dvc, cmd, env)


def _make_summary_inputs(root: Path) -> None:
    """The folders the summary stage depends on, empty where no stage fills them: DVC refuses a
    missing dependency, and `evaluate.cross_ipcs: []` (or decompose_ipcs) leaves one unmade."""
    for name in ("evaluate", "crossarch", "decompose"):
        (root / "metrics" / name).mkdir(parents=True, exist_ok=True)


def _check_can_run(root: Path, dvc: str) -> None:
    """What stops `datm repro` whatever params.yaml says, refused before --preset replaces it:
    no folder, no DVC, or DATM_RANKS, which no stage accepts under DVC (stages/launch.py)."""
    from datm.errors import UserError

    if not root.is_dir():
        raise UserError(f"--root {root}: no such folder")
    if not (os.path.isfile(dvc) and os.access(dvc, os.X_OK)):
        raise UserError("dvc is not installed in this environment: `pip install -e "
                        "'.[pipeline]'` (scripts/setup.sh installs it)")
    if os.environ.get(launch.RANKS_ENV, "").strip():
        raise UserError(f"{launch.RANKS_ENV} does not apply to `datm repro` (DVC runs the "
                        f"stages): set launch.<stage> in params.yaml and unset {launch.RANKS_ENV}")


def _check_repro(root: Path) -> None:
    """What every stage would refuse, refused before DVC starts: DVC deletes a stage's outputs
    (those not `persist`) before its command runs, and would print its own lines about the
    stage's failure. So all of params.yaml and its device on this machine, as the stages load
    them. Without a params.yaml DVC says what is missing: it resolves dvc.yaml before any
    stage."""
    if (root / "params.yaml").exists():
        common.load(root / "params.yaml").torch_device()
        _check_stage_params(root, root / "params.yaml")


def _check_stage_params(root: Path, params: Path) -> None:
    """Every param the project's dvc.yaml names is in `params` (cli/stage_params.py)."""
    import yaml

    from cli import stage_params
    from datm.errors import UserError

    if not (root / "dvc.yaml").is_file():
        return  # DVC says that itself, before any stage
    lacking = stage_params.missing(root / "dvc.yaml", yaml.safe_load(params.read_text()) or {})
    if lacking:
        raise UserError(f"{params} lacks {lacking[0]}, which dvc.yaml's stages depend on (DVC "
                        "would stop there, after the stages before it ran): add it; datm's "
                        "params.yaml shows every setting")


@app.command()
def ui(port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5000,
       workers: Annotated[int, typer.Option(min=1, help="server processes (one serves one "
                                            "person; each loads MLflow)")] = 1,
       root: RootOpt = Path(".")) -> None:
    """Serve the MLflow UI on the local store, on loopback only."""
    import signal
    import socket
    import time

    from datm.tracking import artifact_root, default_uri

    with socket.socket() as probe:  # the server would only log the clash, then exit 0
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            common.console.print(f"[bold red]error:[/] port {port} on 127.0.0.1 is taken "
                                 f"({exc.strerror}): pick another with --port", highlight=False)
            raise typer.Exit(2) from None
    uri = default_uri(root)
    common.console.print(f"MLflow UI for {uri} at http://127.0.0.1:{port}  (Ctrl-C stops it)")
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    # a SQLite store's artifacts lie beside it (datm.tracking), wherever the project now is
    artifacts = artifact_root(uri)
    extra = ["--artifacts-destination", str(artifacts)] if artifacts else []
    # MLflow's default is 4 workers: on a 2-core machine the page then takes 1.5x as long to come
    # up (24.7 s vs 16.6 s, measured), for one reader. A process group of its own, so that
    # stopping datm stops the server's workers too: a signal to datm alone would leave them
    # listening.
    server = subprocess.Popen([mlflow, "ui", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", str(workers), "--backend-store-uri", uri, *extra],
                              env=env, start_new_session=True)
    received: list[int] = []

    def signal_group(signum: int) -> bool:
        """Send `signum` to the server's group; False if nothing is left in it."""
        try:
            os.killpg(server.pid, signum)
        except ProcessLookupError:
            return False
        return True

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        signal_group(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = server.wait()
    deadline = time.monotonic() + 5  # workers outliving the server get a moment, then KILL
    while signal_group(0) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_group(signal.SIGKILL)
    raise typer.Exit(128 + received[0] if received else code)


VEGA_INSTALL = "npm install --prefix .plots vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0"


def _offline_page(root: Path) -> str:
    """plots/page.html with its vega scripts written into it: an HTML template for DVC whose
    page renders without a network and wherever it is copied."""
    import re

    from datm.errors import UserError

    page = root / "plots" / "page.html"
    if not page.is_file():
        raise UserError(f"{page} is missing: the HTML template of `datm plots`")

    def inline(match: re.Match) -> str:
        # the sources are relative to dvc_plots/ in the project (or in datm's own checkout)
        for base in (root, PRESETS.parent):
            source = (base / "dvc_plots" / match.group(1)).resolve()
            if source.is_file():
                code = source.read_text(encoding="utf-8").replace("</script", "<\\/script")
                return f"<script>{code}</script>"
        raise UserError(f"{match.group(1).split('node_modules/')[-1]} is not installed: run "
                        f"`{VEGA_INSTALL}` in the project (scripts/setup.sh does)")

    return re.sub(r'<script src="([^"]+)"></script>', inline, page.read_text(encoding="utf-8"))


@app.command()
def plots(revisions: Annotated[list[str] | None, typer.Argument(
              help="commits or experiments to compare (`dvc plots diff`); none: the workspace")]
          = None,
          out: Annotated[Path, typer.Option("--out", "-o", help="folder of the page")]
          = Path("dvc_plots"),
          root: RootOpt = Path(".")) -> None:
    """Draw accuracy vs IPC and each IPC's matching loss as an HTML page that works offline.

    `dvc plots show` / `dvc plots diff` with the vega scripts from .plots/ instead of a CDN."""
    import tempfile

    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "page.html"
        _run(lambda: template.write_text(_offline_page(root), encoding="utf-8"))
        cmd = [dvc, "plots", "diff", *revisions] if revisions else [dvc, "plots", "show"]
        cmd += ["--html-template", str(template), "-o", str(out.resolve())]
        code = subprocess.call(cmd, cwd=root)
    raise typer.Exit(code)


def _dvc_changed(root: Path) -> set[str] | None:
    """The stages `dvc status` lists (changed deps, params, code or outputs), or None when
    this is no DVC project or dvc cannot tell."""
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return None
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    try:
        out = subprocess.run([dvc, "status", "--json"], cwd=root, capture_output=True, text=True,
                             timeout=300)
        listed = json.loads(out.stdout.strip() or "{}") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    # stages of dvc.yaml appear by name; others as "path/dvc.yaml:name"
    return None if not isinstance(listed, dict) else {k.rsplit(":", 1)[-1] for k in listed}


@app.command()
def status(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Show which artifacts exist and what `dvc status` would re-run.

    How far the expert buffer and each distillation are; the table goes to stdout."""
    from rich.console import Console
    from rich.table import Table

    from datm import artifacts, pipeline
    from datm.pipeline.evaluate import baseline_path

    def go() -> None:
        p, pa = common.load(str(params)), common.paths(root)
        changed = _dvc_changed(root)
        table = Table("artifact", "state", "path")

        def row(name: str, stage: str, path: Path, state: str) -> None:
            # an artifact that exists but that DVC would re-run is not done: say so
            if changed and stage in changed and path.exists():
                state = "stale (dvc status)" if state in ("ok", "done") else \
                    f"{state}, stale (dvc status)"
            table.add_row(name, state, str(path))

        def ok(path: Path) -> str:
            return "ok" if path.is_file() else "missing"

        for name, path in (("train split", pa.train), ("test split", pa.test)):
            row(name, "download", path, ok(path))
        row("zca", "zca", pa.zca, ok(pa.zca))
        buf = pipeline.buffer_status(pa)
        acc = (f", mean test acc {buf['mean_test_acc']:.4f} (the full-set reference)"
               if buf["mean_test_acc"] else "")
        row("experts", "buffers", pa.buffers,
            f"{buf['experts']}/{p.buffers.num_experts}{acc}")
        for ipc in p.ipcs:
            cfg = p.distill(ipc)
            if pa.distilled(ipc).is_file():
                state = "done"
            elif pa.checkpoint(ipc).is_file():
                try:
                    it = artifacts.read_meta(pa.checkpoint(ipc)).get("iteration", 0)
                    state = f"checkpoint {it}/{cfg.iterations}"
                except artifacts.ArtifactError:
                    state = "damaged checkpoint (distill starts over)"
            else:
                state = "missing"
            row(f"distilled ipc {ipc}", f"distill@{ipc}", pa.distilled(ipc), state)
            row(f"baseline ipc {ipc}", f"baseline@{ipc}", baseline_path(pa, ipc),
                ok(baseline_path(pa, ipc)))
            row(f"evaluated ipc {ipc}", f"evaluate@{ipc}", pa.evaluation(ipc),
                ok(pa.evaluation(ipc)))
            if ipc in p.cross_ipcs:
                row(f"crossarch ipc {ipc}", f"crossarch@{ipc}", pa.crossarch(ipc),
                    ok(pa.crossarch(ipc)))
            if ipc in p.decompose_ipcs:
                row(f"decompose ipc {ipc}", f"decompose@{ipc}", pa.decompose(ipc),
                    ok(pa.decompose(ipc)))
        report = pa.reports / "summary.md"
        row("summary", "summary", report, ok(report))
        if changed is not None:
            table.caption = ("dvc status: " + (", ".join(sorted(changed)) + " would re-run"
                                               if changed else "up to date"))
        # stdout, for `datm status | less`; a pipe gets room for whole paths, not 80 columns
        Console(width=None if sys.stdout.isatty() else 200).print(table)

    _run(go)


if __name__ == "__main__":
    app()
