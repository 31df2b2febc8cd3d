"""datm.evaluate, the protocol (docs/METHOD.md, "How numbers are measured") behind every accuracy datm
reports, and the `datm export` -> `datm evaluate --from` round trip that must reproduce them.

The protocol: a fresh network per model, SGD (momentum 0.9, weight decay 5e-4) at the given lr,
x0.1 at half the epochs, DSA on every batch, soft cross-entropy against softmax(labels) for a
distilled set or hard cross-entropy for real images; mean and sample std over the models.
"""

from __future__ import annotations

import math

import helpers
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import ResNet

from datm import evaluate, pipeline
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
    """A tiny project whose distilled set stays inside the pixel range (lr_img 1 on images with
    a margin from 0 and 255), evaluated long enough to score above chance: 2 models, 30 epochs
    at the set's learned lr."""
    raw = helpers.tiny_params()
    raw["buffers"].update({"num_experts": 2, "epochs": 2, "batch": 16})
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


def test_an_export_evaluates_as_the_distilled_set(tmp_path, monkeypatch):
    """`evaluate --from` on the safetensors export trains on the same set (model space, after
    the float32 ZCA round trip), with the same labels, lr, recipe and seeds as evaluate@N's
    distilled row, so it must report the same accuracies.

    Tolerance: the inputs differ only by the de-whiten / clip / re-whiten round trip. The set is
    built to stay inside [0, 1] (asserted), so there is no clipping and the difference is
    float32 rounding (< 1e-4 asserted, ~1e-6 seen); that can flip a test prediction only for
    an image on a decision boundary, so each model's accuracy may move by at most one test image
    (1/60); measured: identical.
    """
    raw = round_trip_params()
    paths = helpers.tiny_project(tmp_path / "project", raw, lo=40, hi=215)
    params = Params.from_dict(raw)
    pipeline.distill(params, paths, 2)
    spy = EvalSpy(monkeypatch)
    ev = pipeline.evaluate_ipc(params, paths, 2)
    folder = pipeline.export_ipc(params, paths, 2, "safetensors", tmp_path / "export")
    result = pipeline.evaluate_export(params, paths, folder)
    dist, rand, exported = spy.calls
    assert dist["result"]["accs"] == [r["acc"] for r in ev["runs"] if r["set"] == "distilled"]

    tensors, meta = pipeline.load_distilled(paths.distilled(2))
    md = pipeline.model_data(paths, torch.device("cpu"))
    pixels = md.zca.dewhiten(tensors["images"])
    assert pixels.min() > 0 and pixels.max() < 1, "premise: the set needs no clipping"
    # same set, labels, lr, recipe and seeds
    assert (exported["x"] - dist["x"]).abs().max() < 1e-4
    assert torch.equal(exported["targets"], dist["targets"])
    assert torch.equal(dist["targets"], tensors["labels"])
    assert exported["lr"] == dist["lr"] == pytest.approx(float(tensors["lr"][0]))
    for key in ("spec", "epochs", "models", "cfg", "aug", "seed"):
        assert exported[key] == dist[key], key
    assert torch.equal(exported["x_test"], dist["x_test"])
    assert dist["models"] == 2 and dist["epochs"] == 30

    # and the numbers: above chance, different per model, equal within one test image
    n_test = md.y_test.numel()
    assert result["accs"] == pytest.approx(dist["result"]["accs"], abs=1 / n_test + 1e-9)
    assert result["acc_mean"] == pytest.approx(ev["distilled"], abs=1 / n_test + 1e-9)
    assert result["acc_std"] == pytest.approx(ev["distilled_std"], abs=1 / n_test + 1e-9)
    assert ev["distilled"] > 0.45, ev  # 3 classes: chance is 1/3
    assert result["lr"] == pytest.approx(float(tensors["lr"][0])) and result["models"] == 2
    # the random real baseline is another set with its own seeds
    assert rand["seed"] != dist["seed"] and rand["lr"] == params.evaluate.random_lr


def test_evaluate_ipc_records_each_models_lr_and_recipe(tmp_path):
    raw = round_trip_params()
    raw["evaluate"].update({"epochs": 2, "lr_scale": 3.0, "random_lr": 0.02, "batch": 5})
    paths = helpers.tiny_project(tmp_path, raw)
    params = Params.from_dict(raw)
    pipeline.distill(params, paths, 1)
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
    from test_steps import tiny_raw

    raw = tiny_raw()
    paths = helpers.tiny_project(tmp_path, raw)
    params = Params.from_dict(raw)
    pipeline.distill(params, paths, 1)
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
