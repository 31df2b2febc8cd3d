"""Stage summary: accuracy vs IPC for distilled / random real / full set, figures, a report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from datm import artifacts
from datm.config import Params, Paths
from datm.pipeline.project import check_finite, distilled_pixels, load_distilled
from datm.tracking import git_commit
from datm.visual import GRID_PER_CLASS, class_grid, save_png
from stages import common


def _write_csv(path: Path, rows: list[dict]) -> None:
    with artifacts.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _accuracy_figure(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ipcs = [r["ipc"] for r in rows]
    for key, label in (("distilled", "distilled (DATM)"), ("init", "its initialization"),
                       ("random_real", "random real subset")):
        if any(r.get(key) is None for r in rows):
            continue
        ax.errorbar(ipcs, [100 * r[key] for r in rows],
                    yerr=[100 * r[f"{key}_std"] for r in rows], marker="o", capsize=4,
                    label=label)
    full = rows[0].get("full_dataset")
    if full:
        ax.axhline(100 * full, color="gray", linestyle="--", label="full dataset")
    ax.set_xscale("log")
    ax.set_xticks(ipcs, [str(i) for i in ipcs])
    ax.set_xlabel("images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    return fig


def _grids(p: Params, pa: Paths) -> list[Path]:
    """The de-whitened grid of every IPC, and every IPC's matching loss in one long table
    (iteration, ipc, loss): `dvc plots` draws one panel per IPC from it (plots/loss.json)."""
    out, losses = [], []
    for ipc in p.ipcs:
        tensors, meta = load_distilled(pa.distilled(ipc))
        check_finite(pa.distilled(ipc), images=tensors["images"], labels=tensors["labels"],
                     lr=tensors["lr"])  # never a picture of a diverged set in the report
        pixels = distilled_pixels(pa, tensors, meta)
        out.append(save_png(class_grid(pixels, len(meta["classes"])),
                            pa.reports / f"grid_ipc_{ipc}.png"))
        losses += [{"iteration": int(r[0]) + 1, "ipc": ipc, "loss": r[1]}
                   for r in tensors["history"].tolist()]
    _write_csv(pa.metrics / "plots" / "loss.csv",
               losses or [{"iteration": 0, "ipc": p.ipcs[0], "loss": float("nan")}])
    return out


def _pct(value: float | None, signed: bool = False) -> str:
    return "" if value is None else f"{100 * value:{'+' if signed else ''}.2f}"


def _crossarch_table(rows: list[dict], cross: dict[int, list[dict]], arch: str) -> list[str]:
    """Each set on the architecture it was evaluated with and on the others (crossarch@N)."""
    if not any(cross.values()):
        return []
    lines = ["## Cross-architecture", "", "The distilled set and a random real subset of the "
             "same size, trained with the IPC's recipe on each architecture.", "",
             "| IPC | architecture | distilled | random real |", "|---:|---|---:|---:|"]
    for r in rows:
        for row in [{**r, "arch": arch}, *cross.get(r["ipc"], [])]:
            lines.append(f"| {r['ipc']} | {row['arch']} | {_pct(row['distilled'])} ± "
                         f"{_pct(row['distilled_std'])} | {_pct(row['random_real'])} ± "
                         f"{_pct(row['random_real_std'])} |")
    return lines + [""]


def _decompose_table(parts: dict[int, dict]) -> list[str]:
    """Per IPC, the four sets of decompose@N: where the gain over random real comes from."""
    if not parts:
        return []
    lines = ["## Where the gain comes from", "",
             "Each IPC's recipe, four sets: the distilled images with their learned labels "
             "(evaluate@N) and with hard labels, at the distilled set's lr and seeds; a random "
             "real subset (baseline@N's) with the experts' soft labels (DATM's label rule) and "
             "with hard labels (baseline@N), at the baseline's lr and seeds. Images gain: "
             "distilled vs random images, both with hard labels; labels gain: soft vs hard "
             "labels on the random images.", "",
             "| IPC | distilled + learned labels | distilled + hard labels | random real + "
             "expert labels | random real + hard labels | images gain | labels gain |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for ipc, d in sorted(parts.items()):
        cells = [f"{_pct(d[k])} ± {_pct(d[k + '_std'])}" for k in
                 ("distilled_soft", "distilled_hard", "random_soft", "random_hard")]
        lines.append(f"| {ipc} | {' | '.join(cells)} | {_pct(d['images_gain'], signed=True)} | "
                     f"{_pct(d['labels_gain'], signed=True)} |")
    return lines + [""]


def _environment(rows: list[dict]) -> str:
    envs = {json.dumps(r.get("env"), sort_keys=True) for r in rows if r.get("env")}
    if len(envs) != 1:
        return "" if not envs else " Measured under several environments (see metrics/)."
    env = json.loads(envs.pop())
    threads = f", {env['threads']} thread(s) per process" if env.get("threads") else ""
    return (f" Measured with torch {env['torch']}, torchvision {env['torchvision']} on "
            f"{env['device']}{threads} (they change the last digits).")


def _markdown(rows: list[dict], grids: list[Path], p: Params, classes: list[str],
              commit: str, cross: dict[int, list[dict]], parts: dict[int, dict]) -> str:
    """The report: where each IPC stands against the full set, under which recipe, and what
    the sets look like; with the commit and settings it was made from."""
    lines = ["# datm summary", "",
             f"Dataset `{p.data.name}`, network {p.evaluate.arch} (width {p.net.width}, depth "
             f"{p.net.depth}); mean ± std test accuracy (%) of fresh networks; git commit "
             f"`{commit}`. Full dataset: the experts' final test accuracy (they train on the "
             "whole training set to convergence). Gap: distilled minus full dataset (lossless "
             f"at >= 0).{_environment(rows)}", "",
             "![accuracy vs IPC](accuracy_vs_ipc.png)", "",
             "Initialization: the exact set the distillation started from, under the same "
             "recipe; matching gain: distilled minus it (what the trajectory matching adds).", "",
             "| IPC | share of the training set (%) | distilled | initialization | matching gain "
             "| random real | full dataset | gap | evaluation: models x epochs (SGD steps each) "
             "| final matching loss |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        cfg = p.evaluation(r["ipc"])
        steps = cfg.epochs * -(-r["ipc"] * len(classes) // cfg.batch)
        lines.append(
            f"| {r['ipc']} | {_pct(r.get('train_fraction'))} | {_pct(r['distilled'])} ± "
            f"{_pct(r['distilled_std'])} | "
            + (f"{_pct(r['init'])} ± {_pct(r['init_std'])} | "
               f"{_pct(r['matching_gain'], signed=True)} | " if r.get("init") is not None
               else "- | - | ")
            + f"{_pct(r['random_real'])} ± "
            f"{_pct(r['random_real_std'])} | {_pct(r.get('full_dataset'))}"
            + (f" ± {_pct(r['full_dataset_std'])}" if r.get("full_dataset_std") is not None
               else "") + " | "
            f"{_pct(r.get('gap_to_full'), signed=True)} | {cfg.models} x {cfg.epochs} ({steps}) "
            f"| {r['matching_loss']:.4f} |")
    lines += ["", *_crossarch_table(rows, cross, p.evaluate.arch), *_decompose_table(parts),
              "## Distilled images "
              "(de-whitened)", "",
              "One row per class, top to bottom: " + ", ".join(classes) + ".", ""]
    for grid, ipc in zip(grids, p.ipcs):
        shown = min(ipc, GRID_PER_CLASS)
        note = f" (the first {shown} of {ipc} images per class)" if shown < ipc else ""
        lines += [f"### IPC {ipc}{note}", "", f"![{grid.stem}]({grid.name})", ""]
    lines += ["## Settings", "", "```json", json.dumps(common.settings(p), indent=1), "```", ""]
    return "\n".join(lines)


def _read(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise artifacts.ArtifactError(f"missing {path}: run {stage} first")
    return json.loads(path.read_text())


def run(params: str = "params.yaml", root: str = ".") -> dict:
    p, pa = common.load(params), common.paths(root)
    rows = [_read(pa.evaluation(ipc), f"evaluate@{ipc}") for ipc in p.ipcs]
    cross = {ipc: _read(pa.crossarch(ipc), f"crossarch@{ipc}")["archs"] for ipc in p.cross_ipcs}
    parts = {ipc: _read(pa.decompose(ipc), f"decompose@{ipc}") for ipc in p.decompose_ipcs}
    with common.tracker("summary", p, root) as tracker:
        fig = _accuracy_figure(rows, pa.reports / "accuracy_vs_ipc.png")
        tracker.figure(fig, "accuracy_vs_ipc.png")
        grids = _grids(p, pa)
        for grid in grids:
            tracker.artifact(grid, "grids")
        for r in rows:
            tracker.metrics({"distilled_acc": r["distilled"], "random_acc": r["random_real"]},
                            r["ipc"])
            # every IPC's result on the parent run, also those DVC took from its cache
            tracker.pipeline_metrics({f"decompose.ipc{r['ipc']}.{k}": v
                                      for k, v in parts.get(r["ipc"], {}).items()
                                      if k.endswith(("soft", "hard", "gain"))})
            tracker.pipeline_metrics({f"acc.distilled.ipc{r['ipc']}": r["distilled"],
                                      f"acc.init.ipc{r['ipc']}": r.get("init"),
                                      f"acc.random_real.ipc{r['ipc']}": r["random_real"],
                                      "acc.full_dataset": r.get("full_dataset"),
                                      f"matching_loss.ipc{r['ipc']}": r["matching_loss"]})
        table = [{"ipc": r["ipc"], "distilled": r["distilled"], "init": r.get("init"),
                  "random_real": r["random_real"],
                  "full_dataset": r.get("full_dataset")} for r in rows]
        _write_csv(pa.metrics / "plots" / "accuracy.csv", table)
        report = pa.reports / "summary.md"
        with artifacts.atomic_path(report) as tmp:
            classes = load_distilled(pa.distilled(p.ipcs[0]))[1]["classes"]
            tmp.write_text(_markdown(rows, grids, p, classes, git_commit(root), cross, parts))
        tracker.artifact(report)
    common.console.print(f"[green]summary:[/] {report}")
    return {"accuracy": table, "report": str(report)}


if __name__ == "__main__":
    args = common.parse(__doc__)
    common.main(lambda: run(args.params, args.root))
