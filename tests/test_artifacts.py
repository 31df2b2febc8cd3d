"""datm.artifacts: safetensors round trips, kind checks, damage, atomic writes; Split and ZCA."""

from __future__ import annotations

import os

import pytest
import torch

from datm import artifacts, data, distill, experts, zca
from datm.artifacts import ArtifactError

# Every kind of artifact the pipeline writes, with tensors shaped like the real ones.
KINDS = {
    data.KIND: lambda g: {"images": torch.randint(0, 256, (6, 1, 8, 8), generator=g,
                                                  dtype=torch.int64).to(torch.uint8),
                          "labels": torch.randint(0, 3, (6,), generator=g)},
    zca.KIND: lambda g: {"mean": torch.randn(64, generator=g),
                         "matrix": torch.randn(64, 64, generator=g),
                         "inverse": torch.randn(64, 64, generator=g)},
    experts.KIND: lambda g: {"trajectory": torch.randn(4, 37, generator=g)},
    distill.RESULT: lambda g: {"images": torch.randn(6, 1, 8, 8, generator=g),
                               "labels": torch.randn(6, 3, generator=g),
                               "lr": torch.tensor([0.01]),
                               "history": torch.randn(5, 6, generator=g, dtype=torch.float64)},
    distill.CHECKPOINT: lambda g: {"images": torch.randn(6, 1, 8, 8, generator=g),
                                   "m_images": torch.randn(6, 1, 8, 8, generator=g),
                                   "rng": torch.Generator().manual_seed(3).get_state()},
    "export": lambda g: {"images": torch.rand(6, 3, 8, 8, generator=g),
                         "class_ids": torch.arange(3).repeat_interleave(2)},
    "export-labels": lambda g: {"label_logits": torch.randn(6, 3, generator=g)},
}

META = {"classes": ["a", "b", "c"], "nested": {"x": [1, 2.5, None], "flag": True},
        "text": "ünïcode, \"quotes\" and\nnewlines", "number": 1e-7}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_every_kind(tmp_path, kind):
    tensors = KINDS[kind](torch.Generator().manual_seed(0))
    path = artifacts.save(tmp_path / "sub" / f"{kind}.safetensors", tensors, kind, META)
    assert path.is_file()

    loaded, meta = artifacts.load(path, kind)
    assert meta == META
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value), key
    assert artifacts.read_meta(path, kind) == META
    assert artifacts.read_meta(path) == META  # no kind: no check

    # keys= restricts what is read
    first = sorted(tensors)[0]
    only, _ = artifacts.load(path, kind, keys=[first])
    assert list(only) == [first] and torch.equal(only[first], tensors[first])

    # load_rows reads selected rows of any 2-D tensor, in the order asked
    for key, value in tensors.items():
        if value.dim() == 2 and value.shape[0] >= 3:
            rows = [2, 0, 2]
            assert torch.equal(artifacts.load_rows(path, key, rows, kind), value[rows])


def test_save_does_not_touch_callers_views(tmp_path):
    base = torch.arange(24.0).view(4, 6)
    view = base.t()  # non-contiguous
    artifacts.save(tmp_path / "v.safetensors", {"v": view}, "k")
    loaded, _ = artifacts.load(tmp_path / "v.safetensors", "k")
    assert torch.equal(loaded["v"], view)
    assert not view.is_contiguous()


def test_empty_meta_and_no_tensors(tmp_path):
    artifacts.save(tmp_path / "e.safetensors", {}, "empty")
    tensors, meta = artifacts.load(tmp_path / "e.safetensors", "empty")
    assert tensors == {} and meta == {}


def test_wrong_kind_raises(tmp_path):
    path = artifacts.save(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, "zca")
    for call in (lambda: artifacts.load(path, "expert"),
                 lambda: artifacts.read_meta(path, "expert"),
                 lambda: artifacts.load_rows(path, "a", [0], "expert")):
        with pytest.raises(ArtifactError) as info:
            call()
        assert "zca" in str(info.value) and "expert" in str(info.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        artifacts.load(tmp_path / "nope.safetensors")
    with pytest.raises(ArtifactError, match="missing"):
        artifacts.read_meta(tmp_path / "nope.safetensors")


def _damaged_versions(good: bytes) -> dict[str, bytes]:
    return {"empty": b"", "4 bytes": good[:4], "20 bytes": good[:20],
            "half": good[: len(good) // 2], "minus 10": good[:-10],
            "garbage": b"this is not a safetensors file" * 10,
            "huge header length": (2**40).to_bytes(8, "little") + good[8:]}


@pytest.mark.parametrize("damage", list(_damaged_versions(b"x" * 100)))
def test_corrupt_file_raises_one_line(tmp_path, damage):
    path = artifacts.save(tmp_path / "c.safetensors", {"t": torch.randn(50, 20)}, "expert",
                          {"spec": "s"})
    path.write_bytes(_damaged_versions(path.read_bytes())[damage])
    for call in (lambda: artifacts.load(path, "expert"),
                 lambda: artifacts.read_meta(path, "expert"),
                 lambda: artifacts.load_rows(path, "t", [0, 1], "expert")):
        with pytest.raises(ArtifactError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message, message
        assert str(path) in message
        assert info.value.__cause__ is None  # suppressed: the user sees one clean line


def test_unknown_tensor_key_raises(tmp_path):
    path = artifacts.save(tmp_path / "k.safetensors", {"t": torch.zeros(3, 2)}, "k")
    with pytest.raises(ArtifactError):
        artifacts.load(path, "k", keys=["missing"])
    with pytest.raises(ArtifactError):
        artifacts.load_rows(path, "missing", [0], "k")


def test_atomic_path_leaves_nothing_when_block_raises(tmp_path):
    final = tmp_path / "deep" / "out.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with artifacts.atomic_path(final) as tmp:
            assert tmp != final and tmp.parent == final.parent
            tmp.write_bytes(b"half written")
            raise RuntimeError("boom")
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # the temp file is gone as well


def test_atomic_path_keeps_old_file_when_block_raises(tmp_path):
    final = artifacts.save(tmp_path / "out.safetensors", {"a": torch.ones(3)}, "k", {"v": 1})
    with pytest.raises(KeyboardInterrupt):
        with artifacts.atomic_path(final) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    tensors, meta = artifacts.load(final, "k")
    assert meta == {"v": 1} and torch.equal(tensors["a"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_atomic_path_success_replaces_and_is_readable(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("old")
    with artifacts.atomic_path(final) as tmp:
        tmp.write_text("new")
        assert final.read_text() == "old"  # not visible before the block ends
    assert final.read_text() == "new"
    assert os.stat(final).st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_save_killed_mid_write_keeps_previous_artifact(tmp_path, monkeypatch):
    path = artifacts.save(tmp_path / "a.safetensors", {"a": torch.ones(2)}, "k", {"v": 1})

    def dying_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 16)  # a few bytes, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        artifacts.save(path, {"a": torch.zeros(5)}, "k", {"v": 2})
    assert artifacts.read_meta(path, "k") == {"v": 1}
    assert torch.equal(artifacts.load(path, "k")[0]["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# --- data.Split and zca.ZCA ------------------------------------------------------------------

def test_split_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, 3, 8, 8), generator=g).to(torch.uint8)
    labels = torch.randint(0, 4, (10,), generator=g)
    mean, std = data.channel_stats(images)
    split = data.Split(images, labels, ["w", "x", "y", "z"], "somewhere", mean, std)
    assert split.num_classes == 4 and split.shape == (3, 8, 8)
    split.save(tmp_path / "train.safetensors", "train")
    assert artifacts.read_meta(tmp_path / "train.safetensors", data.KIND)["split"] == "train"

    back = data.Split.load(tmp_path / "train.safetensors")
    assert back.images.dtype == torch.uint8 and torch.equal(back.images, images)
    assert back.labels.dtype == torch.int64 and torch.equal(back.labels, labels)
    assert back.classes == split.classes and back.source == "somewhere"
    assert back.mean == pytest.approx(mean) and back.std == pytest.approx(std)


def test_split_load_rejects_other_kinds(tmp_path):
    zca.ZCA().save(tmp_path / "zca.safetensors")
    with pytest.raises(ArtifactError):
        data.Split.load(tmp_path / "zca.safetensors")


def test_zca_round_trip_enabled(tmp_path):
    x = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    fitted = zca.fit(x, eps=0.1)
    fitted.save(tmp_path / "zca.safetensors", {"eps": 0.1})
    meta = artifacts.read_meta(tmp_path / "zca.safetensors", zca.KIND)
    assert meta["enabled"] is True and meta["eps"] == 0.1
    back = zca.ZCA.load(tmp_path / "zca.safetensors")
    assert back.enabled
    for name in ("mean", "matrix", "inverse"):
        assert torch.equal(getattr(back, name), getattr(fitted, name))
    assert torch.equal(back.whiten(x), fitted.whiten(x))


def test_zca_round_trip_disabled(tmp_path):
    zca.ZCA().save(tmp_path / "zca.safetensors")
    assert artifacts.read_meta(tmp_path / "zca.safetensors", zca.KIND)["enabled"] is False
    back = zca.ZCA.load(tmp_path / "zca.safetensors")
    assert not back.enabled
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(back.whiten(x), x) and torch.equal(back.dewhiten(x), x)


def test_zca_load_rejects_other_kinds(tmp_path):
    artifacts.save(tmp_path / "e.safetensors", {"trajectory": torch.zeros(2, 3)}, experts.KIND)
    with pytest.raises(ArtifactError):
        zca.ZCA.load(tmp_path / "e.safetensors")
