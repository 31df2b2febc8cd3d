"""`datm init DATASET`: a datm project for a new dataset, in an empty folder.

It looks at the data (classes, images per class, channels, size), chooses every setting for it
and says why, and writes a project that `dvc repro` runs as it is: git and DVC initialised,
dvc.yaml (the pipeline; its code dependencies point at this datm installation), params.yaml
(every setting, commented), the plot templates and ignore files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from datm.data import IMAGE_SUFFIXES, DataError, open_image
from datm.errors import UserError
from datm.networks import NetSpec, convnet_feature_size

CHECKOUT = Path(__file__).resolve().parent.parent  # the datm source tree: dvc.yaml, plots/
CANDIDATE_IPCS = (1, 10, 50, 100, 500, 1000)
# torchvision datasets by name: (data.name, classes, train images per class, channels, side)
KNOWN = {"fashion_mnist": ("fashion_mnist", 10, 6000, 1, 28),
         "cifar10": ("cifar10", 10, 5000, 3, 32), "cifar100": ("cifar100", 100, 500, 3, 32),
         "tiny_imagenet": ("tiny_imagenet", 200, 500, 3, 64)}
CPU_ZCA_DIMS = 3072     # a D x D eigendecomposition: seconds at 3072 on a CPU, minutes at 12288
GPU_ZCA_DIMS = 12288
EXPERT_STEPS = 7500     # SGD steps of batch 64 that brought Fashion-MNIST's experts to converge


class InitError(UserError):
    """A folder or dataset `datm init` cannot set a project up for."""


@dataclass
class DataSummary:
    name: str              # data.name
    root: str              # data.root
    classes: list[str]
    per_class: list[int]   # training images per class
    channels: int
    side: int              # the most common image side (square images assumed)
    test_split: bool       # a test/ folder (else data.test_fraction is held out)
    notes: list[str]

    @property
    def train_images(self) -> int:
        return sum(self.per_class)


def inspect(dataset: str) -> DataSummary:
    """What the project needs to know of DATASET: an image folder's path or a torchvision name."""
    key = dataset.lower().replace("-", "_")
    if key in KNOWN and not Path(dataset).exists():
        name, k, n, c, side = KNOWN[key]
        return DataSummary(name, "datasets", [str(i) for i in range(k)], [n] * k, c, side, True,
                           [f"{name}: torchvision's dataset, downloaded into datasets/ by the "
                            "download stage (where there is internet)"])
    root = Path(dataset).expanduser().resolve()
    if not root.is_dir():
        raise InitError(f"{dataset} is neither a folder nor one of {', '.join(KNOWN)}")
    train = root / "train" if (root / "train").is_dir() else root
    folders = sorted(d for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(folders) < 2:
        raise InitError(f"{train} has {len(folders)} class folder(s): an image folder holds one "
                        "subfolder of images per class (optionally under train/ and test/)")
    files = {d.name: sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
             for d in folders}
    empty = [name for name, f in files.items() if not f]
    if empty:
        raise InitError(f"class folder {train / empty[0]} holds no images")
    channels, side, notes = _look_at(files)
    return DataSummary("imagefolder", str(root), list(files), [len(f) for f in files.values()],
                       channels, side, (root / "test").is_dir(), notes)


def _look_at(files: dict[str, list[Path]], per_class: int = 5) -> tuple[int, int, list[str]]:
    """Channels and side from a few images of every class."""
    modes, sizes = Counter(), Counter()
    for paths in files.values():
        for path in paths[:per_class]:
            try:
                with open_image(path) as im:  # as the download stage reads it: size limit too
                    modes[im.mode] += 1
                    sizes[im.size] += 1
            except DataError as exc:
                raise InitError(str(exc)) from None
    gray = all(m in ("L", "1", "I", "I;16", "F", "LA") for m in modes)
    (w, h), _ = sizes.most_common(1)[0]
    notes = [f"images: {dict(modes)} modes, sizes {dict(sizes.most_common(3))} (of the first "
             f"{per_class} per class)"]
    if w != h:
        notes.append(f"images are {w}x{h}: the download stage resizes them to squares")
    return (1 if gray else 3), max(w, h), notes


@dataclass
class Choice:
    key: str
    value: object
    why: str


def choose(data: DataSummary, gpu: bool) -> list[Choice]:
    """Every setting that depends on the data or the machine, with the reason for it."""
    size = data.side if data.side <= 32 else (64 if gpu else 32)
    depth = 3 if size <= 32 else 4 if size <= 64 else 5
    dims = data.channels * size * size
    zca_on = dims <= (GPU_ZCA_DIMS if gpu else CPU_ZCA_DIMS)
    steps_per_epoch = max(1, data.train_images // 64)
    epochs = min(50, max(8, round(EXPERT_STEPS / steps_per_epoch)))
    smallest = min(data.per_class)
    top = 1000 if gpu else 50
    ipcs = [i for i in CANDIDATE_IPCS if i <= smallest // 2 and i <= top] or [1]
    side = convnet_feature_size(NetSpec(data.channels, 2, size, depth=depth))
    choices = [] if data.name != "imagefolder" else [
        Choice("data.im_size", size,
               f"images are {data.side} px" + (f"; resized to {size} px (a larger side costs "
                                                 "{:.0f}x per image)".format((data.side / size) ** 2)
                                                 if size != data.side else ", kept")),
        Choice("data.channels", data.channels,
               "grayscale images" if data.channels == 1 else "colour images")]
    choices += [
        Choice("net.width", 128 if gpu else 32,
               "the paper's width (GPU)" if gpu else "a 2-core CPU trains width 32 ~8x faster "
               "than the paper's 128"),
        Choice("net.depth", depth, f"{size} px pooled {depth} times ends at {side}x{side} "
               "features"),
        Choice("zca.enabled", zca_on, f"{dims} dimensions: " + (
            "the whitening is cheap (a D x D eigendecomposition)" if zca_on else
            "its D x D eigendecomposition would take minutes to hours here; images are "
            "normalized per channel instead")),
        Choice("buffers.num_experts", 20 if gpu else 3,
               "more trajectories to match (the paper: 100)" if gpu else "what a CPU affords"),
        Choice("buffers.epochs", epochs, f"~{EXPERT_STEPS} SGD steps of batch 64 ({steps_per_epoch}"
               " per epoch) with a cosine lr: converged experts, the full-set reference"),
        Choice("distill.ipcs", ipcs, f"the smallest class has {smallest} training images: IPCs "
               f"up to half of it" + ("" if gpu else ", at most 50 on a CPU")),
        Choice("evaluate.models / epochs", (5, 1000) if gpu else (2, 300),
               "the paper's protocol" if gpu else "the CPU profile's"),
    ]
    if data.name == "imagefolder" and not data.test_split:
        choices.append(Choice("data.test_fraction", 0.2, "no test/ folder: 20 % of every class "
                              "is held out as the test split"))
    return choices


def params_text(data: DataSummary, choices: list[Choice], gpu: bool) -> str:
    """params.yaml for the project: every setting, commented."""
    get = {"data.im_size": 0, **{c.key: c.value for c in choices}}
    ipcs = get["distill.ipcs"]
    models, epochs = get["evaluate.models / epochs"]
    k = len(data.classes)
    iterations = {1: 300, 10: 200, 50: 150} if not gpu else {}

    def ipc_line(ipc: int) -> str:
        steps = 10 if ipc == 1 or ipc >= 100 else 20
        batch = min(ipc * k, max(k, {1: k, 10: 5 * k, 50: 10 * k}.get(ipc, 20 * k)))
        lr_img = 1000 if ipc == 1 else 100 if ipc <= 50 else 50
        its = iterations.get(ipc, 20 if not gpu else 5000)
        return (f'    "{ipc}": {{window: auto, syn_steps: {steps}, expert_epochs: 1, '
                f'batch_syn: {batch}, lr_img: {lr_img}, iterations: {its}}}')

    big = [i for i in ipcs if i >= 500]
    lines = [
        f"# datm project for {data.root if data.name == 'imagefolder' else data.name}, written "
        "by `datm init` (every choice and why: `datm init` printed them; docs/OWN_DATA.md).",
        "seed: 0",
        "device: auto            # auto | cpu | cuda | cuda:1 ...",
        "",
        "data:",
        f"  name: {data.name}",
        f"  root: {data.root}",
    ]
    if data.name == "imagefolder":
        lines += [f"  im_size: {get['data.im_size']}           # images are resized to this side",
                  f"  channels: {data.channels}            # 1: grayscale, 3: RGB",
                  "  test_fraction: 0.2     # held-out share per class when there is no test/"]
    lines += [
        "",
        "zca:                    # whitening of the raw pixels (docs/METHOD.md)",
        f"  enabled: {str(get['zca.enabled']).lower()}",
        "  eps: 0.1",
        "",
        "net:",
        f"  width: {get['net.width']}",
        f"  depth: {get['net.depth']}",
        "  norm: instance",
        "",
        "augment:",
        "  strategy: color_crop_cutout_flip_scale_rotate   # drop flip for digit-like data",
        "",
        "buffers:                # experts: also the full-set reference",
        f"  num_experts: {get['buffers.num_experts']}",
        f"  epochs: {get['buffers.epochs']}",
        "  lr: 0.1",
        "  schedule: cosine      # converges in the epochs given",
        "  momentum: 0.0",
        "  weight_decay: 0.0",
        "  batch: 64",
        "  rho: 0.0              # > 0: GSAM flat-minimum experts (the reference's, on GPUs)",
        "  alpha: 0.0",
        "  adaptive: false",
        "  group: 1",
        f"  compile: {'false' if gpu else 'true'}         # torch.compile the experts' loss: "
        + ("not measured on GPUs yet" if gpu else "1.35x per step on a CPU"),
        "",
        "distill:",
        f"  ipcs: [{', '.join(map(str, ipcs))}]",
        "  defaults:",
        "    threshold: 1.0",
        "    mode: recompute",
        "    precision: float32",
        "    init: real_correct",
        "    labels: expert",
        "    label_epoch: -1",
        "    learn_labels: true",
        "    lr_y: 5",
        "    lr_lr: 1.0e-5",
        "    checkpoint_every: 25",
        "    grid_every: 50",
        "  ipc:                  # window: auto: T-, T+ from the experts' curve (docs/METHOD.md)",
        *[ipc_line(i) for i in ipcs],
        "",
        "evaluate:",
        f"  models: {models}",
        f"  epochs: {epochs}",
        f"  batch: {128 if gpu else 25}",
        "  momentum: 0.9",
        "  weight_decay: 5.0e-4",
        "  arch: convnet",
        f"  cross_archs: [{'convnet_bn, resnet18' if gpu else 'convnet_bn'}]",
        f"  cross_ipcs: [{', '.join(str(i) for i in ipcs if i == 10 or gpu)}]",
        f"  decompose_ipcs: [{', '.join(str(i) for i in ipcs if i in (1, 10))}]",
        f"  lr_scale: {1.0 if gpu else 0.2}        # x the learned lr",
        "  lr: 0.0",
        "  augment: true",
        "  compile: false        # torch.compile: pays for thousands of steps, not a small set's",
        "  random_lr: 0.01",
        "  ipc:                  # every IPC has an entry: its own recipe, or {}",
        *[f'    "{i}": ' + ("{epochs: 40, batch: 128, lr: 0.01}" if i in big else "{}")
          for i in ipcs],
        "",
        "launch:                 # processes per stage on this machine",
        *[f"  {stage}: {1 if gpu or stage in ('buffers', 'distill') else 2}"
          for stage in ("buffers", "baseline", "distill", "evaluate", "crossarch", "decompose")],
        "",
    ]
    return "\n".join(lines)


def dvc_yaml_text() -> str:
    """datm's dvc.yaml with its code dependencies (datm/..., stages/...) made absolute paths
    into this installation: a change to datm's code re-runs the stages it affects here too."""
    source = (CHECKOUT / "dvc.yaml").read_text()
    return re.sub(r"(?<![\w/.])((?:datm|stages)/[\w/]+\.py)",
                  lambda m: str(CHECKOUT / m.group(1)), source)


def create(folder: Path, dataset: str, gpu: bool | None = None) -> tuple[DataSummary, list[Choice]]:
    """Write the project into `folder` (empty or missing) and initialise git and DVC there."""
    if not (CHECKOUT / "dvc.yaml").is_file():
        raise InitError(f"datm init needs datm's source checkout (dvc.yaml beside {CHECKOUT}): "
                        "install datm from a git clone (scripts/setup.sh)")
    if folder.exists() and any(p.name != ".git" for p in folder.iterdir()):
        raise InitError(f"{folder} is not empty: run `datm init` in an empty folder")
    data = inspect(dataset)
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    choices = choose(data, gpu)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(params_text(data, choices, gpu))
    (folder / "dvc.yaml").write_text(dvc_yaml_text())
    shutil.copytree(CHECKOUT / "plots", folder / "plots")
    for name in (".gitignore", ".dvcignore"):
        shutil.copyfile(CHECKOUT / name, folder / name)
    for sub in ("crossarch", "decompose"):  # the summary stage depends on these folders
        (folder / "metrics" / sub).mkdir(parents=True, exist_ok=True)
        (folder / "metrics" / sub / ".gitkeep").touch()
    from stages import common

    common.load(folder / "params.yaml")  # what we wrote must load (a bug otherwise)
    for marker, cmd in ((".git", ["git", "init", "-q"]), (".dvc", [_dvc(), "init", "-q"])):
        if (folder / marker).is_dir():
            continue
        done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise InitError(f"`{' '.join(cmd)}` failed in {folder}: {done.stderr.strip()[:300]}")
    return data, choices


def _dvc() -> str:
    import sys

    return shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
