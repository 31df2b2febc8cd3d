"""datm.evaluate, the protocol (docs/METHOD.md, "How numbers are measured") behind every accuracy datm
reports, and the `datm export` -> `datm evaluate --from` round trip that must reproduce them.

The protocol: a fresh network per model, SGD (momentum 0.9, weight decay 5e-4) at the given lr,
x0.1 at half the epochs, DSA on every batch, soft cross-entropy against softmax(labels) for a
distilled set or hard cross-entropy for real images; mean and sample std over the models.
"""

from __future__ import annotations

import json
import math

import helpers
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import ResNet

from datm import artifacts, data, evaluate, export, pipeline
from datm.augment import AugConfig
from datm.config import ARCHS, EvalConfig, Params
from datm.networks import ConvNet, NetSpec

SPEC = NetSpec(channels=1, num_classes=3, im_size=8, width=8, depth=2)
AUG = AugConfig()  # DSA on: every family


@pytest.fixture(scope="module")
def blobs():
    """(x, y, x_test, y_test): 60 + 60 separable 1x8x8 images of 3 classes."""
    x, y = helpers.blobs(120, 3, channels=1, size=8, seed=0, noise=0.5)
    return x[:60], y[:60], x[60:], y[60:]


class Built:
    """Spy on `datm.evaluate.build`: the networks train_and_test trains, in build order."""

    def __init__(self, monkeypatch) -> None:
        self.models: list[torch.nn.Module] = []
        real = evaluate.build

        def build(spec: NetSpec) -> torch.nn.Module:
            self.models.append(real(spec))
            return self.models[-1]

        monkeypatch.setattr(evaluate, "build", build)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- train_and_test ------------------------------------------------------------------------------

def test_a_separable_problem_is_learned(blobs):
    x, y, xt, yt = blobs
    acc = evaluate.train_and_test(SPEC, x, y, 0.01, 20, EvalConfig(batch=16), AUG, xt, yt, seed=0)
    assert acc > 0.9, acc


def test_the_lr_drops_tenfold_at_half_the_epochs(blobs, monkeypatch):
    """SGD momentum 0.9, weight decay 5e-4 at `lr`, then lr x0.1 from epoch epochs // 2 on."""
    x, y, xt, yt = blobs

    class SpySGD(torch.optim.SGD):
        made: list[SpySGD] = []

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.lrs: list[float] = []
            SpySGD.made.append(self)

        def step(self, closure=None):
            self.lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", SpySGD)
    cfg = EvalConfig(batch=4)  # 12 images: 3 steps an epoch
    for epochs in (6, 7):
        events: list[dict] = []
        evaluate.train_and_test(SPEC, x[:12], y[:12], 0.02, epochs, cfg, AUG, xt, yt, seed=0,
                                callback=events.append)
        opt = SpySGD.made[-1]
        group = opt.param_groups[0]
        assert group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
        per_epoch = [opt.lrs[3 * e:3 * e + 3] for e in range(epochs)]
        assert len(opt.lrs) == 3 * epochs
        half = epochs // 2
        expected = [0.02] * half + [0.002] * (epochs - half)
        for e, lrs in enumerate(per_epoch):
            assert lrs == pytest.approx([expected[e]] * 3, rel=1e-12), (epochs, e, lrs)
        assert [e["epoch"] for e in events] == list(range(1, epochs + 1))


def test_every_batch_is_augmented_and_each_epoch_sees_every_image_once(blobs, monkeypatch):
    x, y, xt, yt = blobs
    calls: list[tuple[torch.Tensor, AugConfig]] = []
    real = evaluate.augment

    def spy(images, aug, gen):
        calls.append((images.clone(), aug))
        return real(images, aug, gen)

    monkeypatch.setattr(evaluate, "augment", spy)
    evaluate.train_and_test(SPEC, x[:10], y[:10], 0.01, 3, EvalConfig(batch=4), AUG, xt, yt, 0)
    assert [c[0].shape[0] for c in calls] == [4, 4, 2] * 3
    assert all(c[1] == AUG for c in calls)  # DSA on, the configured families
    for epoch in range(3):
        seen = torch.cat([c[0] for c in calls[3 * epoch:3 * epoch + 3]])
        # every image once: the epoch's batches are a permutation of the set
        assert sorted(seen.flatten(1).sum(1).tolist()) == pytest.approx(
            sorted(x[:10].flatten(1).sum(1).tolist()), rel=1e-6)
    calls.clear()
    evaluate.train_and_test(SPEC, x[:10], y[:10], 0.01, 1, EvalConfig(batch=4, augment=False),
                            AUG, xt, yt, 0)
    assert calls and all(not c[1].enabled for c in calls)  # evaluate.augment: false turns DSA off


def test_one_hot_soft_labels_train_like_hard_labels(blobs, monkeypatch):
    """Labels 50 x one_hot: softmax differs from one-hot by e^-50 ~ 2e-22, far below float32's
    resolution, so soft cross-entropy is hard cross-entropy up to the rounding of two code
    paths. Same seed, same batches, same DSA draws: the trained weights agree to 1e-6 (measured:
    bit-equal; 60 SGD steps would have to amplify a one-ulp difference 10x to reach 1e-6).
    Margin 5 (probabilities 0.987 / 0.007) must train visibly differently: the soft targets are
    read through softmax, not as probabilities or class ids."""
    x, y, xt, yt = blobs
    built = Built(monkeypatch)
    cfg = EvalConfig(batch=16)
    run = lambda targets: evaluate.train_and_test(SPEC, x, targets, 0.01, 20, cfg, AUG, xt, yt, 3)  # noqa: E731
    hard = run(y)
    soft = run(50.0 * F.one_hot(y, 3).float())
    softer = run(5.0 * F.one_hot(y, 3).float())
    w_hard, w_soft, w_softer = (flat(m) for m in built.models)
    assert soft == hard > 0.9
    assert (w_soft - w_hard).abs().max() <= 1e-6
    assert (w_softer - w_hard).abs().max() > 1e-4
    assert softer > 0.9


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_builds_and_trains_a_step(arch, channels, size, monkeypatch):
    base = NetSpec(channels, 4, size, width=8, depth=3)
    spec = evaluate.arch_spec(base, arch)
    kind, norm = {"convnet": (ConvNet, "instance"), "convnet_bn": (ConvNet, "batch"),
                  "resnet18": (ResNet, "batch")}[arch]
    assert spec.norm == norm and (spec.model == "resnet18") == (arch == "resnet18")
    x, y = helpers.blobs(6, 4, channels=channels, size=size, seed=1)
    built = Built(monkeypatch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = flat(evaluate.build(spec))  # what train_and_test starts from (its seed 0)
    acc = evaluate.train_and_test(spec, x[:4], y[:4], 0.01, 1, EvalConfig(batch=4), AUG,
                                  x[4:], y[4:], seed=0)
    (model,) = built.models[1:]
    assert isinstance(model, kind)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert has_bn is (norm == "batch")
    trained = flat(model)
    assert trained.shape == fresh.shape and torch.isfinite(trained).all()
    assert not torch.equal(trained, fresh), "no optimizer step was taken"
    assert acc in (0.0, 0.5, 1.0)
    with torch.no_grad():
        assert model.eval()(x).shape == (6, 4)


# --- evaluate_set ---------------------------------------------------------------------------------

def test_evaluate_set_reports_mean_and_sample_std_over_distinct_seeds(blobs, monkeypatch):
    x, y, xt, yt = blobs
    seeds: list[int] = []
    accs = iter([0.5, 0.75, 1.0, 0.25, 0.5, 0.75, 0.6])

    def fake(spec, xs, targets, lr, epochs, cfg, aug, x_test, y_test, seed, callback=None,
             test_every=0):
        seeds.append(seed)
        return next(accs)

    monkeypatch.setattr(evaluate, "train_and_test", fake)
    args = (SPEC, x, y, 0.01, 2)
    rest = (EvalConfig(), AUG, xt, yt)
    three = evaluate.evaluate_set(*args, 3, *rest, seed=0)
    assert three["accs"] == [0.5, 0.75, 1.0]
    assert three["mean"] == pytest.approx(0.75)
    # sample std (n - 1): sqrt((0.25^2 + 0 + 0.25^2) / 2) = 0.25 (population std: 0.204)
    assert three["std"] == pytest.approx(0.25)
    other = evaluate.evaluate_set(*args, 3, *rest, seed=1)
    assert other["std"] == pytest.approx(0.25) and other["mean"] == pytest.approx(0.5)
    one = evaluate.evaluate_set(*args, 1, *rest, seed=2)
    assert one == {"mean": pytest.approx(0.6), "std": 0.0, "accs": [0.6],
                   "seconds": one["seconds"]}
    assert len(set(seeds[:3])) == 3, seeds  # a fresh network per model
    assert not set(seeds[:3]) & set(seeds[3:6]), seeds  # another base seed, other networks
    assert len(three["seconds"]) == 3 and min(three["seconds"]) >= 0


def test_evaluate_set_models_really_differ(blobs):
    """Real training: per-model accuracies are not copies of one run, and the std is theirs."""
    x, y, xt, yt = blobs
    result = evaluate.evaluate_set(SPEC, x[:9], y[:9], 0.01, 3, 3, EvalConfig(batch=9), AUG,
                                   xt, yt, seed=0)
    accs = result["accs"]
    assert len(set(accs)) > 1, accs
    mean = sum(accs) / 3
    assert result["mean"] == pytest.approx(mean)
    assert result["std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in accs) / 2))


class RngSpy:
    """A stand-in for the `torch` module inside datm.evaluate that records every seed the
    protocol seeds a random stream with (the global RNG and torch.Generator)."""

    def __init__(self) -> None:
        self.seeds: list[tuple[str, int]] = []
        spy = self

        class Generator(torch.Generator):
            def manual_seed(self, seed):
                spy.seeds.append(("generator", int(seed)))
                return super().manual_seed(seed)

        self.Generator = Generator

    def manual_seed(self, seed):
        self.seeds.append(("global", int(seed)))
        return torch.manual_seed(seed)

    def __getattr__(self, name):
        return getattr(torch, name)


def test_every_random_stream_of_evaluate_set_has_its_own_seed(blobs, monkeypatch):
    x, y, xt, yt = blobs
    spy = RngSpy()
    monkeypatch.setattr(evaluate, "torch", spy)
    evaluate.evaluate_set(SPEC, x[:6], y[:6], 0.01, 1, 3, EvalConfig(), AUG, xt, yt, seed=0)
    assert len(spy.seeds) >= 6  # per model: its init and its data order, at least
    values = [s for _, s in spy.seeds]
    assert len(set(values)) == len(values), spy.seeds


# --- the lr of a distilled set, and random real subsets -------------------------------------------

def test_distilled_lr_is_the_set_lr_unless_evaluate_lr_is_set():
    assert evaluate.distilled_lr(EvalConfig(), 0.037) == pytest.approx(0.037)
    assert evaluate.distilled_lr(EvalConfig(lr_scale=2.5), 0.04) == pytest.approx(0.1)
    assert evaluate.distilled_lr(EvalConfig(lr=0.003), 0.04) == pytest.approx(0.003)
    assert evaluate.distilled_lr(EvalConfig(lr=0.003, lr_scale=7), 0.04) == pytest.approx(0.003)


def unbalanced_labels() -> torch.Tensor:
    """Classes of 10, 7 and 5 images, shuffled."""
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 5)
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]


def test_random_subset_has_ipc_images_of_each_class():
    y = unbalanced_labels()
    for ipc in (1, 4, 5):
        idx = evaluate.random_subset(y, ipc, 3, seed=0)
        assert idx.shape == (3 * ipc,)
        assert len(set(idx.tolist())) == 3 * ipc  # no image twice
        assert torch.equal(y[idx], torch.arange(3).repeat_interleave(ipc))  # each from its class


def test_random_subset_is_seeded_and_random():
    y = unbalanced_labels()
    a = evaluate.random_subset(y, 3, 3, seed=5)
    assert torch.equal(a, evaluate.random_subset(y, 3, 3, seed=5))
    assert not torch.equal(a, evaluate.random_subset(y, 3, 3, seed=6))
    # over seeds, every image of every class gets drawn: not a fixed "first ipc"
    drawn = torch.cat([evaluate.random_subset(y, 3, 3, seed=s) for s in range(60)])
    assert set(drawn.tolist()) == set(range(len(y)))


def test_validation_images_are_not_the_random_baselines_draw():
    y = unbalanced_labels()
    val = evaluate.validation_subset(y, 3, 3, seed=0)
    assert torch.equal(y[val], torch.arange(3).repeat_interleave(3))
    assert not torch.equal(val, evaluate.random_subset(y, 3, 3, seed=0))


# --- the export round trip: `datm export` -> `datm evaluate --from` ---------------------------------

def round_trip_params() -> dict:
    """A tiny project evaluated long enough to score above chance: 2 models, 30 epochs at the
    set's learned lr."""
    raw = helpers.tiny_params()
    raw["buffers"].update({"num_experts": 2, "epochs": 2, "batch": 16, "schedule": "constant"})
    raw["evaluate"].update({"models": 2, "epochs": 30, "lr": 0.0, "lr_scale": 1.0})
    raw["distill"]["ipc"][2].update({"batch_syn": 3, "lr_img": 1})
    return raw


class EvalSpy:
    """Spy on `datm.evaluate.evaluate_set`: the arguments of each call, and its result."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[dict] = []
        real = evaluate.evaluate_set
        names = ("spec", "x", "targets", "lr", "epochs", "models", "cfg", "aug", "x_test",
                 "y_test", "seed")

        def spy(*args, **kwargs):
            call = {**dict(zip(names, args)), **kwargs}
            call["result"] = real(*args, **kwargs)
            self.calls.append(call)
            return call["result"]

        monkeypatch.setattr(evaluate, "evaluate_set", spy)


@pytest.fixture(scope="module")
def far_out(tmp_path_factory):
    """A distilled and evaluated tiny project whose set lies far outside the pixel range, as
    real distilled sets do (Fashion-MNIST IPC 1 spans -4 .. 5.5 de-whitened): the distilled
    images are scaled by 4 in model space by hand before evaluate@2 measures them."""
    root = tmp_path_factory.mktemp("far-out")
    raw = round_trip_params()
    paths = helpers.tiny_project(root / "project", raw)
    params = Params.from_dict(raw)
    pipeline.distill_ipc(params, paths, 2)
    tensors, meta = pipeline.load_distilled(paths.distilled(2))
    tensors["images"] = tensors["images"] * 4
    artifacts.save(paths.distilled(2), tensors, "distilled", meta)
    pixels = pipeline.distilled_pixels(paths, tensors, meta, clip=False)
    outside = float(((pixels < 0) | (pixels > 1)).float().mean())
    assert outside > 0.3 and pixels.min() < -1 and pixels.max() > 2, "premise: far outside"
    return root, paths, params


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "npz"])
def test_a_lossless_export_evaluates_exactly_as_the_distilled_set(far_out, monkeypatch, fmt):
    """`evaluate --from` on a lossless export trains on the very tensors evaluate@N trained on
    (the export's `inputs`), with the same labels, lr, recipe and seeds: the same accuracies,
    to the bit; and the card carries evaluate@N's number as the export's own. (With the old
    export, pixels clipped to [0, 1], this set lost 10 points at Fashion-MNIST IPC 1.)"""
    root, paths, params = far_out
    spy = EvalSpy(monkeypatch)
    ev = pipeline.evaluate_ipc(params, paths, 2)
    folder = pipeline.export_ipc(params, paths, 2, fmt, root / f"export-{fmt}", force=True)
    result = pipeline.evaluate_from(params, paths, folder)
    dist, init, _, exported = spy.calls  # distilled, its initialization, random real, export
    tensors, _ = pipeline.load_distilled(paths.distilled(2))
    assert torch.equal(init["x"], tensors["init_images"])
    assert torch.equal(init["targets"], tensors["init_labels"])
    assert torch.equal(exported["x"], dist["x"]) and torch.equal(dist["x"], tensors["images"])
    assert torch.equal(exported["targets"], dist["targets"])
    assert exported["lr"] == dist["lr"] == pytest.approx(float(tensors["lr"][0]))
    for key in ("spec", "epochs", "models", "cfg", "aug", "seed"):
        assert exported[key] == dist[key], key
    assert torch.equal(exported["x_test"], dist["x_test"])
    assert result["accs"] == dist["result"]["accs"] == [
        r["acc"] for r in ev["runs"] if r["set"] == "distilled"]
    assert ev["distilled"] > 0.45, ev  # 3 classes: chance is 1/3
    card = json.loads((folder / "dataset_card.json").read_text())
    assert card["lossless"] and card["pixels"]["outside_0_1"] > 0.3
    assert card["accuracy"]["distilled"] == (
        f"{100 * ev['distilled']:.2f} ± {100 * ev['distilled_std']:.2f} % (2 models)")
    # the pixels are the set too: unclipped, they preprocess back to `inputs` (float rounding)
    pixels = export.read(folder).pixels
    md = pipeline.model_data(paths, torch.device("cpu"))
    back = data.pixels_to_model_space(pixels, md.mean, md.std, md.zca)
    assert (back - tensors["images"]).abs().max() < 1e-3 * tensors["images"].abs().max()


def test_a_png_export_is_its_own_set_and_its_card_says_so(far_out, monkeypatch):
    """8 bits cannot hold a set spanning -1 .. 2 at full precision: each image is stored over its
    own range, decoded back within (hi - lo) / 510, and the card never gives the pipeline's
    number as the PNGs': it says "not measured" until they are measured, then their own."""
    root, paths, params = far_out
    pipeline.evaluate_ipc(params, paths, 2)
    folder = pipeline.export_ipc(params, paths, 2, "png", root / "export-png", force=True)
    card = json.loads((folder / "dataset_card.json").read_text())
    assert not card["lossless"] and card["accuracy"]["distilled"] == export.NOT_MEASURED
    assert "lossless_set" in card["accuracy"] and "8 bits" in card["accuracy"]["measured"]
    tensors, meta = pipeline.load_distilled(paths.distilled(2))
    pixels = pipeline.distilled_pixels(paths, tensors, meta, clip=False)
    back = export.read(folder).pixels
    assert (back - pixels).abs().max() <= card["png"]["max_error"] + 1e-6
    assert card["png"]["max_error"] < 0.01 * float(pixels.max() - pixels.min())
    spy = EvalSpy(monkeypatch)
    result = pipeline.evaluate_from(params, paths, folder)
    assert not torch.equal(spy.calls[0]["x"], tensors["images"])  # 8 bits: close, not equal
    export.record_accuracy(folder, pipeline_describe(result), "by a test", result["files_digest"],
                           result["card_recipe"])
    card = json.loads((folder / "dataset_card.json").read_text())
    assert card["accuracy"]["distilled"] == pipeline_describe(result)
    assert pipeline_describe(result) in (folder / "README.md").read_text()


def pipeline_describe(result: dict) -> str:
    from datm.pipeline.export import describe_result

    return describe_result(result)


def test_a_card_is_not_measured_when_evaluate_measured_another_version(far_out, tmp_path):
    root, paths, params = far_out
    pipeline.evaluate_ipc(params, paths, 2)
    tensors, meta = pipeline.load_distilled(paths.distilled(2))
    saved = paths.distilled(2).read_bytes()
    try:
        tensors["labels"] = tensors["labels"] + 1  # distill@2 ran again; evaluate@2 did not
        artifacts.save(paths.distilled(2), tensors, "distilled", meta)
        folder = pipeline.export_ipc(params, paths, 2, "npz", tmp_path / "stale")
    finally:
        paths.distilled(2).write_bytes(saved)
    card = json.loads((folder / "dataset_card.json").read_text())
    assert card["accuracy"]["distilled"] == export.NOT_MEASURED
    assert "another version" in card["accuracy"]["note"]


def test_an_export_of_a_set_with_nan_is_refused(far_out, tmp_path):
    root, paths, params = far_out
    tensors, meta = pipeline.load_distilled(paths.distilled(2))
    saved = paths.distilled(2).read_bytes()
    try:
        tensors["images"][0, 0, 0, 0] = float("nan")
        artifacts.save(paths.distilled(2), tensors, "distilled", meta)
        for fmt in export.FORMATS:
            with pytest.raises(export.ExportError, match="NaN or inf"):
                pipeline.export_ipc(params, paths, 2, fmt, tmp_path / fmt)
            assert not (tmp_path / fmt).exists()
    finally:
        paths.distilled(2).write_bytes(saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit, says", [
    (lambda t: t.update(inputs=t["inputs"][1:], images=t["images"][1:],
                        label_logits=t["label_logits"][1:], class_ids=t["class_ids"][1:]),
     "images, the card says"),
    (lambda t: t.update(lr=t["lr"] * 2), "lr"),
    (lambda t: t.update(label_logits=t["label_logits"][:, :-1]), "classes"),
    (lambda t: t["inputs"].view(-1).__setitem__(0, float("inf")), "NaN or infinite"),
])
def test_an_export_whose_tensors_are_not_its_cards_is_refused(far_out, tmp_path, edit, says):
    """A file edited or swapped after the export is not measured under the card's name."""
    root, paths, params = far_out
    folder = pipeline.export_ipc(params, paths, 2, "safetensors", tmp_path / "x")
    tensors, meta = artifacts.load(folder / "images.safetensors", "export")
    edit(tensors)
    artifacts.save(folder / "images.safetensors", tensors, "export", meta)
    with pytest.raises(export.ExportError, match="does not match|NaN or infinite") as err:
        export.read(folder)
    assert says in str(err.value)


def test_evaluate_ipc_records_each_models_lr_and_recipe(tmp_path):
    raw = round_trip_params()
    raw["evaluate"].update({"epochs": 2, "lr_scale": 3.0, "random_lr": 0.02, "batch": 5})
    paths = helpers.tiny_project(tmp_path, raw)
    params = Params.from_dict(raw)
    pipeline.distill_ipc(params, paths, 1)
    learned = float(pipeline.load_distilled(paths.distilled(1))[0]["lr"][0])
    ev = pipeline.evaluate_ipc(params, paths, 1)
    runs = {s: [r for r in ev["runs"] if r["set"] == s] for s in ("distilled", "random real")}
    assert [r["model"] for r in runs["distilled"]] == [0, 1]
    assert all(r["lr"] == pytest.approx(3 * learned) for r in runs["distilled"])
    assert all(r["lr"] == 0.02 for r in runs["random real"])
    assert all(r["epochs"] == 2 and r["batch"] == 5 for r in ev["runs"])
    accs = [r["acc"] for r in runs["distilled"]]
    assert ev["distilled"] == pytest.approx(sum(accs) / 2)
    assert ev["distilled_std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))


def test_test_every_reports_an_accuracy_curve(blobs):
    x, y, xt, yt = blobs
    events: list[dict] = []
    evaluate.train_and_test(SPEC, x, y, 0.01, 5, EvalConfig(batch=16), AUG, xt, yt, seed=0,
                            callback=events.append, test_every=2)
    curve = [(e["epoch"], e["acc"]) for e in events if e["event"] == "test"]
    assert [epoch for epoch, _ in curve] == [2, 4]  # the last epoch is the returned accuracy
    assert all(0 <= acc <= 1 for _, acc in curve)
    events.clear()
    evaluate.train_and_test(SPEC, x, y, 0.01, 5, EvalConfig(batch=16), AUG, xt, yt, seed=0,
                            callback=events.append)
    assert not [e for e in events if e["event"] == "test"]


def test_crossarch_evaluates_the_set_and_a_random_subset_on_each_other_arch(tmp_path):
    from test_pipeline import tiny_raw

    raw = tiny_raw()
    raw["evaluate"].update(cross_archs=[], cross_ipcs=[])
    paths = helpers.tiny_project(tmp_path, raw)
    params = Params.from_dict(raw)
    pipeline.distill_ipc(params, paths, 1)
    none = pipeline.crossarch_ipc(params, paths, 1)
    assert none["archs"] == [] and paths.crossarch(1).is_file()  # the stage's output exists
    raw["evaluate"]["cross_archs"] = ["convnet_bn"]
    params = Params.from_dict(raw)
    result = pipeline.crossarch_ipc(params, paths, 1)
    (row,) = result["archs"]
    assert row["arch"] == "convnet_bn" and 0 <= row["distilled"] <= 1
    assert {r["arch"] for r in row["runs"]} == {"convnet_bn"}
    m = params.evaluate.models
    assert [r["set"] for r in row["runs"]] == ["distilled"] * m + ["random real"] * m
    assert "seconds" not in paths.crossarch(1).read_text()


# --- a card's number is its files' under its recipe, or "not measured" ----------------------------

def test_a_card_shows_evaluates_number_only_under_the_recipe_it_measured(far_out, tmp_path):
    """Any setting the number depends on, changed after evaluate@2 measured the set, makes the
    card say "not measured" and name it (not only lr, epochs, batch and arch); the threads per
    process too, since they change the rounding."""
    from dataclasses import replace

    root, paths, params = far_out
    pipeline.evaluate_ipc(params, paths, 2)
    ev, aug, net = params.evaluate, params.augment, params.net
    changes = {
        "seed": replace(params, evaluate=replace(ev, seed=7)),
        "momentum": replace(params, evaluate=replace(ev, momentum=0.5)),
        "weight_decay": replace(params, evaluate=replace(ev, weight_decay=0.01)),
        "models": replace(params, evaluate=replace(ev, models=3)),
        "augment.enabled": replace(params, evaluate=replace(ev, augment=False)),
        "augment.strategy": replace(params, augment=replace(aug, strategy="crop_flip")),
        "augment.scale": replace(params, augment=replace(aug, scale=1.5)),
        "net.width": replace(params, net=replace(net, width=net.width + 4)),
    }
    for key, changed in changes.items():
        card = json.loads((pipeline.export_ipc(changed, paths, 2, "safetensors",
                                               tmp_path / key) / "dataset_card.json").read_text())
        assert card["accuracy"]["distilled"] == export.NOT_MEASURED, key
        assert f"{key}: measured" in card["accuracy"]["note"], (key, card["accuracy"]["note"])
        assert card["accuracy"]["random_real"] == export.NOT_MEASURED, key  # same recipe, too
    card = json.loads((pipeline.export_ipc(params, paths, 2, "npz", tmp_path / "threads",
                                           threads=7) / "dataset_card.json").read_text())
    assert card["recipe"]["threads"] == 7
    assert card["accuracy"]["distilled"] == export.NOT_MEASURED
    assert "threads: measured 1, the card 7" in card["accuracy"]["note"]
    same = pipeline.export_ipc(params, paths, 2, "npz", tmp_path / "same")
    accuracy = json.loads((same / "dataset_card.json").read_text())["accuracy"]
    assert "±" in accuracy["distilled"] and "±" in accuracy["random_real"]


def _edit_tensors(key: str, change):
    def edit(folder):
        tensors, meta = artifacts.load(folder / "images.safetensors", "export")
        tensors[key] = change(tensors[key].clone())
        artifacts.save(folder / "images.safetensors", tensors, "export", meta)
    return edit


def _add_at_first(t: torch.Tensor, value: float) -> torch.Tensor:
    t.view(-1)[0] += value
    return t


def _edit_npz(folder):
    import numpy as np

    with np.load(folder / "images.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["inputs"] = arrays["inputs"] * 0
    np.savez(folder / "images.npz", **arrays)


def _invert_a_png(folder):
    from PIL import Image, ImageOps

    path = sorted(folder.rglob("*.png"))[0]
    with Image.open(path) as im:
        ImageOps.invert(im.convert("L")).save(path)


@pytest.mark.parametrize("fmt, edit", [
    ("safetensors", _edit_tensors("inputs", lambda t: _add_at_first(t, 5.0))),
    ("safetensors", _edit_tensors("images", lambda t: _add_at_first(t, 5.0))),
    ("safetensors", _edit_tensors("class_ids", lambda t: (t + 1) % 3)),
    ("safetensors", _edit_tensors("label_logits", lambda t: torch.cat([-t[:1], t[1:]]))),
    ("npz", _edit_npz),
    ("png", _invert_a_png),
], ids=["inputs", "pixels", "class_ids", "label_logits", "npz-inputs", "png-inverted"])
def test_an_edited_export_is_refused_as_not_its_cards_set(far_out, tmp_path, fmt, edit):
    """Files edited after the export, in ways the card's shapes and lr cannot see, are refused
    by `evaluate --from` (one line), never measured under the card's name and number."""
    root, paths, params = far_out
    folder = pipeline.export_ipc(params, paths, 2, fmt, tmp_path / "x")
    export.read(folder)  # the export as written reads
    edit(folder)
    with pytest.raises(export.ExportError, match="changed after the export") as err:
        pipeline.evaluate_from(params, paths, folder)
    assert "\n" not in str(err.value)


def test_record_writes_only_a_number_measured_under_the_cards_recipe(far_out, tmp_path):
    """`evaluate --from --record -p other.yaml`: refused before training (check_from), and
    record_accuracy itself refuses a measurement under another recipe; the card is unchanged."""
    from dataclasses import replace

    from datm.pipeline.export import FromOptions, check_from
    from datm.sets import SetError

    root, paths, params = far_out
    folder = pipeline.export_ipc(params, paths, 2, "png", tmp_path / "png")
    before = (folder / "dataset_card.json").read_text()
    other = replace(params, evaluate=replace(params.evaluate, seed=7))
    with pytest.raises(SetError, match="--record .*seed: measured 7, the card 0"):
        check_from(other, paths, folder, record=True, threads=lambda models: 1)
    with pytest.raises(SetError, match="--record .*--lr"):
        check_from(params, paths, folder, FromOptions(lr=0.01), record=True,
                   threads=lambda models: 1)
    assert check_from(params, paths, folder, record=True, threads=lambda models: 1) == 2
    result = pipeline.evaluate_from(other, paths, folder)
    with pytest.raises(export.ExportError, match="another recipe .*seed: measured 7"):
        export.record_accuracy(folder, pipeline_describe(result), "by a test",
                               result["files_digest"], result["card_recipe"])
    assert (folder / "dataset_card.json").read_text() == before


def test_a_record_is_refused_once_another_export_replaced_the_folder(far_out, tmp_path):
    """A png export measured while `export --force` puts another set in its place: the number
    is not written onto the new card; nor while another export holds the folder's lock."""
    from datm.locks import LockHeld

    root, paths, params = far_out
    folder = pipeline.export_ipc(params, paths, 2, "png", tmp_path / "R")
    result = pipeline.evaluate_from(params, paths, folder)
    with export._locked(folder):
        with pytest.raises(LockHeld, match="being exported"):
            export.record_accuracy(folder, pipeline_describe(result), "by a test",
                                   result["files_digest"], result["card_recipe"])
    pipeline.export_ipc(params, paths, 2, "safetensors", folder, force=True)
    card = (folder / "dataset_card.json").read_text()
    with pytest.raises(export.ExportError, match="changed while it was measured"):
        export.record_accuracy(folder, pipeline_describe(result), "by a test",
                               result["files_digest"], result["card_recipe"])
    assert (folder / "dataset_card.json").read_text() == card
    assert json.loads(card)["format"] == "safetensors"


def test_an_export_to_a_symbolic_link_is_refused_before_anything_is_written(tmp_path):
    x = torch.rand(3, 1, 4, 4)
    real = export.export(x, x, torch.zeros(3, 3), 0.25, ["a", "b", "c"], tmp_path / "real",
                         "safetensors", {"ipc": 1})
    (tmp_path / "lnk").symlink_to(real)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(export.ExportError, match="is a symbolic link") as err:
        export.export(x * 2, x * 2, torch.zeros(3, 3), 0.5, ["a", "b", "c"], tmp_path / "lnk",
                      "safetensors", {"ipc": 1}, force=True)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    assert (tmp_path / "lnk").is_symlink() and export.read(real).lr == 0.25
