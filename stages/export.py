"""`datm export` and `datm evaluate --from` (not DVC stages): the processes around
datm/pipeline/export.py.

`python -m stages.export --from DIR` is the evaluation of a handed-over set; it runs as
params.yaml's `launch.evaluate` processes, as evaluate@N does, so that a lossless export of a
distilled set gives evaluate@N's very number (on a CPU the threads per process change the
rounding).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from datm.config import Params
from datm.distributed import SINGLE, Group, launched
from datm.export import LOSSLESS, record_accuracy
from datm.pipeline.export import FromOptions, check_from, describe_result, evaluate_from, export_ipc
from datm.tracking import git_commit
from stages import common, launch
from stages.evaluate import progress_events


def export(ipc: int, fmt: str, out: str | Path, force: bool = False, root: str = ".",
           params: str = "params.yaml") -> Path:
    """`datm export`: the card's recipe is the evaluation that `params` sets."""
    p = common.load(params)
    models = (p.evaluation(ipc) if ipc in p.ipcs else p.evaluate).models
    path = export_ipc(p, common.paths(root), ipc, fmt, Path(out), force, git_commit(root),
                      evaluation_threads(p, params, models))
    common.console.print(f"[green]exported[/] IPC {ipc} as {fmt} -> {path}"
                         + ("" if fmt in LOSSLESS else " (8-bit; measuring it next)"))
    return path


def evaluation_threads(p: Params, params: str, models: int) -> int | None:
    """The threads per process on a CPU of an evaluation of `models` networks, as
    `launch.start` launches it (evaluate@N, `datm evaluate --from`): one process keeps this
    one's; several take OMP_NUM_THREADS if set, else an equal share of the cores. A card states
    them: they change the float rounding, so a number holds only for its threads."""
    if p.torch_device().type != "cpu":
        return None
    world = launch.processes("evaluate", params, lambda _: models)
    if world == 1:
        return torch.get_num_threads()
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return launch.core_share(world)


def run_from(folder: str | Path, options: FromOptions = FromOptions(), record: bool = False,
             params: str = "params.yaml", root: str = ".", group: Group = SINGLE) -> dict:
    """`datm evaluate --from DIR`: the pipeline's protocol on a handed-over set; `record`
    writes the number into a datm export's card (what `datm export` does for png)."""
    p, pa = common.load(params), common.paths(root)
    name = f"evaluate-from:{Path(folder).name}"
    with common.tracker("evaluate", p, root, name, group) as tracker, \
            common.progress_bar() as bar:
        tracker.params({"from": str(folder), "zca_option": options.zca, "lr_option": options.lr})
        task = bar.add_task(f"evaluate {folder}", total=None, info="")
        events = progress_events(tracker, bar, task, "handed-over set")

        def on_event(e: dict) -> None:
            if e["event"] == "recipe":
                _show_recipe(bar.console, e["recipe"])
                tracker.params({f"recipe.{k}": v for k, v in e["recipe"].items() if k != "notes"})
                tracker.tags({"from_kind": e["recipe"]["kind"]})
            else:
                events(e)

        result = evaluate_from(p, pa, Path(folder), options, on_event, group)
        tracker.metrics({"acc_mean": result["acc_mean"], "acc_std": result["acc_std"]}, 0)
    number = describe_result(result)
    if record and group.is_main:
        record_accuracy(folder, number, f"by `datm evaluate --from` on exactly these files "
                        f"(files digest {result['files_digest']}) under the card's recipe "
                        f"({result['recipe']['models']} models, {result['recipe']['epochs']} "
                        "epochs)", result["files_digest"], result["card_recipe"])
    common.console.print(f"[green]evaluate {folder}:[/] {number} test accuracy"
                         + (" (recorded on its card)" if record else ""))
    return result


def _show_recipe(console, recipe: dict) -> None:
    """The recipe a handed-over set is evaluated with, before the first network trains."""
    console.print(
        f"{recipe['kind']}: {recipe['images']} images"
        + (f" ({recipe['ipc']} per class)" if recipe["ipc"] else "")
        + f", {recipe['label_kind']}; recipe of {recipe['recipe_of']}: {recipe['models']} "
        f"x {recipe['arch']}, {recipe['epochs']} epochs, batch {recipe['batch']}, lr "
        f"{recipe['lr']:.6g} ({recipe['lr_rule']}), seed {recipe['seed']}"
        + (", compiled (torch.compile)" if recipe.get("compile") else "")
        + f"; set: {recipe['preprocessing']}; test split: {recipe['test_split']}",
        highlight=False)
    for note in recipe["notes"]:
        console.print(f"  {note}", highlight=False)


def start_from(folder: str | Path, options: FromOptions = FromOptions(), record: bool = False,
               params: str = "params.yaml", root: str = ".") -> int:
    """`run_from` as `launch.evaluate` (or DATM_RANKS) processes; its exit code."""
    args = ["--from", str(folder), "--params", params, "--root", root]
    if options.zca is not None:
        args.append("--zca" if options.zca else "--no-zca")
    if options.lr:
        args += ["--lr", repr(options.lr)]
    if record:
        args.append("--record")
    # a set that cannot be evaluated (or recorded): one error line here, not one per launched
    # process; its recipe's models bound the processes, as for evaluate@N (same threads)
    models = [0]

    def check() -> None:
        p = common.load(params)
        models[0] = check_from(p, common.paths(root), Path(folder), options, record,
                               lambda most: evaluation_threads(p, params, most))

    code = 0 if launched() else common.guarded(check)
    if code:
        return code
    return launch.start("evaluate", "stages.export", args,
                        lambda group: run_from(folder, options, record, params, root, group),
                        params, most=lambda p: models[0] or p.evaluate.models)


def _parse_args():
    def extra(parser) -> None:
        parser.add_argument("--from", dest="folder", required=True)
        zca = parser.add_mutually_exclusive_group()
        zca.add_argument("--zca", dest="zca", action="store_true", default=None)
        zca.add_argument("--no-zca", dest="zca", action="store_false")
        parser.add_argument("--lr", type=float)
        parser.add_argument("--record", action="store_true")

    return common.parse(__doc__, extra)


if __name__ == "__main__":
    args = _parse_args()
    sys.exit(start_from(args.folder, FromOptions(args.zca, args.lr), args.record, args.params,
                        args.root))
