"""`datm`: the command line. Each stage command runs the very function its DVC stage runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from stages import common

app = typer.Typer(help="Dataset distillation by difficulty-aligned trajectory matching (DATM).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
RootOpt = Annotated[Path, typer.Option("--root", help="project root (data/, artifacts/)")]
PRESETS = Path(__file__).resolve().parent.parent / "presets"


def _run(fn) -> None:
    code = common.guarded(fn)
    if code:
        raise typer.Exit(code)


@app.command("data")
def data_cmd(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Read the dataset into data/{train,test}.safetensors (stage: download)."""
    from stages import download

    _run(lambda: download.run(str(params), str(root)))


@app.command()
def zca(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Fit ZCA whitening on the training images (stage: zca)."""
    from stages import zca as stage

    _run(lambda: stage.run(str(params), str(root)))


@app.command()
def buffers(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Train the expert trajectories; resumes at the next unfinished expert (stage: buffers)."""
    from stages import buffers as stage

    _run(lambda: stage.run(str(params), str(root)))


@app.command()
def distill(ipc: Annotated[int, typer.Option(help="images per class")],
            fresh: Annotated[bool, typer.Option(help="ignore an existing checkpoint")] = False,
            params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Distill one IPC; resumes from its checkpoint after a kill (stage: distill@IPC)."""
    from stages import distill as stage

    _run(lambda: stage.run(ipc, str(params), str(root), fresh))


@app.command()
def fullset(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Accuracy of the evaluation network on the full real training set (stage: fullset)."""
    from stages import evaluate as stage

    _run(lambda: stage.run_fullset(str(params), str(root)))


@app.command()
def evaluate(ipc: Annotated[int | None, typer.Option(help="evaluate this distilled IPC")] = None,
             from_: Annotated[Path | None, typer.Option(
                 "--from", help="evaluate an exported set (a folder from `datm export`)")] = None,
             params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Train fresh networks on a distilled set and report test accuracy (stage: evaluate@IPC)."""
    from stages import evaluate as stage

    if (ipc is None) == (from_ is None):
        common.console.print("[bold red]error:[/] pass exactly one of --ipc N or --from DIR")
        raise typer.Exit(2)
    if ipc is not None:
        _run(lambda: stage.run(ipc, str(params), str(root)))
    else:
        from stages import export as from_stage

        _run(lambda: from_stage.evaluate_folder(from_, str(params), str(root)))


@app.command()
def summary(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Accuracy vs IPC table, figures and reports/summary.md (stage: summary)."""
    from stages import summary as stage

    _run(lambda: stage.run(str(params), str(root)))


@app.command()
def export(ipc: Annotated[int, typer.Option(help="which distilled IPC")],
           out: Annotated[Path, typer.Option(help="output folder")],
           format: Annotated[str, typer.Option(
               "--format", "-f", help="safetensors | pt | npz | png")] = "safetensors",
           force: Annotated[bool, typer.Option(help="overwrite a non-empty --out")] = False,
           root: RootOpt = Path(".")) -> None:
    """Write a distilled set in pixel space with soft labels, lr and a dataset card."""
    from stages import export as stage

    _run(lambda: stage.export(ipc, format, out, force, str(root)))


@app.command()
def repro(targets: Annotated[list[str] | None, typer.Argument(help="stages, e.g. buffers")] = None,
          preset: Annotated[str | None, typer.Option(
              help="first make presets/NAME.yaml the params.yaml (git keeps the old one)")] = None,
          force: Annotated[bool, typer.Option(help="re-run even if up to date")] = False,
          root: RootOpt = Path(".")) -> None:
    """Run the pipeline with `dvc repro` (optionally on a paper preset)."""
    if preset:
        source = PRESETS / f"{preset}.yaml"
        if not source.is_file():
            names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml"))) or "none"
            common.console.print(f"[bold red]error:[/] no preset '{preset}' (presets: {names})")
            raise typer.Exit(2)
        _run(lambda: common.load(str(source)))  # validate before touching params.yaml
        shutil.copyfile(source, root / "params.yaml")
        common.console.print(f"params.yaml is now preset '{preset}' "
                             "(`git checkout params.yaml` restores the default profile)")
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    cmd = [dvc, "repro", *(targets or [])] + (["--force"] if force else [])
    common.console.print(f"[dim]$ {' '.join(cmd)}[/]")
    # dvc.yaml runs `python -m stages...`: make that the python datm runs in (the venv's).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    raise typer.Exit(subprocess.call(cmd, cwd=root, env=env))


@app.command()
def ui(port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5000,
       root: RootOpt = Path(".")) -> None:
    """Serve the MLflow UI on the local store, on loopback only."""
    import signal
    import socket
    import time

    from datm.tracking import default_uri

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
    # A process group of its own, so that stopping datm stops the server's workers too: a
    # signal to datm alone would leave them listening.
    server = subprocess.Popen([mlflow, "ui", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", uri], env=env, start_new_session=True)
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


@app.command()
def status(params: ParamsOpt = Path("params.yaml"), root: RootOpt = Path(".")) -> None:
    """Which artifacts exist, and how far the expert buffer and each distillation are."""
    from rich.table import Table

    from datm import artifacts, pipeline

    def go() -> None:
        p, pa = common.load(str(params)), common.paths(root)
        table = Table("artifact", "state", "path")
        for name, path in (("train split", pa.train), ("test split", pa.test), ("zca", pa.zca)):
            table.add_row(name, "ok" if path.is_file() else "missing", str(path))
        buf = pipeline.buffer_status(pa)
        acc = f", mean test acc {buf['mean_test_acc']:.4f}" if buf["mean_test_acc"] else ""
        table.add_row("experts", f"{buf['experts']}/{p.buffers.num_experts}{acc}", str(pa.buffers))
        table.add_row("fullset", "ok" if pa.fullset.is_file() else "missing", str(pa.fullset))
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
            table.add_row(f"distilled ipc {ipc}", state, str(pa.distilled(ipc)))
            table.add_row(f"evaluated ipc {ipc}",
                          "ok" if pa.evaluation(ipc).is_file() else "missing",
                          str(pa.evaluation(ipc)))
        common.console.print(table)

    _run(go)


if __name__ == "__main__":
    app()
