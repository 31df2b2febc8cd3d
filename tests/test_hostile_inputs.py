"""Hostile inputs and failing disks (issue 38): one line, no code run, nothing finished replaced.

- user files (CIFAR's pickles, images of every reader) are parsed by readers that run no code
  and turn any failure to decode, a size limit included, into one DataError / SetError line;
- a disk that refuses a write (full, read-only) ends a stage or command in one line naming the
  path, and the artifact it would have replaced stays byte for byte, with no temp file beside;
- `export --force` replaces only a folder whose card lists every file datm wrote there;
- SIGTERM, a killed rank and a killed launch each end in one datm line.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import signal
import struct
import sys
import zlib
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from PIL import Image

from datm import artifacts, data, interrupts, sets
from datm import export as export_mod
from datm.config import DataConfig
from datm.data import DataError
from datm.errors import UserError
from stages import common, launch

# --- 1. untrusted bytes -----------------------------------------------------------------------


class _RunsCode:
    """A pickle that calls os.mkdir(marker) when loaded: any callable would do (os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _cifar_config(root: Path) -> DataConfig:
    return DataConfig(name="cifar10", root=str(root))


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_1", "test_batch"])
def test_a_cifar_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, name):
    base = helpers.make_cifar10(tmp_path, per_batch=2, n_test=2)
    marker = tmp_path / "the-pickle-ran"
    with open(base / name, "wb") as f:
        pickle.dump({b"label_names": _RunsCode(marker), b"data": _RunsCode(marker)}, f)
    with pytest.raises(DataError, match=rf"{name} is not a CIFAR python batch .*(os|posix)\.mkdir"):
        data.load(_cifar_config(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "is not a CIFAR python batch"),
    (lambda p: p.write_bytes(os.urandom(300)), "is not a CIFAR python batch"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), "holds a list, not a dict"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8),
                                           b"labels": [0, 1]})), r"uint8 images \[N, 3072\]"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                           b"labels": [0, 99]})), "2 class ids in 0..9"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                           b"labels": "ab"})), "2 class ids in 0..9"),
])
def test_a_damaged_cifar_batch_is_one_data_error_naming_it(tmp_path, damage, fragment):
    base = helpers.make_cifar10(tmp_path, per_batch=2, n_test=2)
    damage(base / "data_batch_3")
    with pytest.raises(DataError, match=rf"data_batch_3.*{fragment}|{fragment}.*data_batch_3"):
        data.load(_cifar_config(tmp_path))


def test_damaged_cifar_meta_is_one_data_error(tmp_path):
    base = helpers.make_cifar10(tmp_path, per_batch=2, n_test=2)
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": 7}))
    with pytest.raises(DataError, match="batches.meta holds no list of class names"):
        data.load(_cifar_config(tmp_path))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_still_read(tmp_path, protocol):
    """Python 2 wrote CIFAR's own files (protocol 2, numpy.core); numpy 2 names numpy._core,
    protocol 5 rebuilds arrays with _frombuffer, Python 3's protocol 2 bytes with _codecs."""
    base = helpers.make_cifar10(tmp_path, per_batch=3, n_test=4)
    expected = data.load(_cifar_config(tmp_path))
    for path in base.iterdir():
        with open(path, "rb") as f:
            content = pickle.load(f)
        path.write_bytes(pickle.dumps(content, protocol=protocol))
    train, test = data.load(_cifar_config(tmp_path))
    assert torch.equal(train.images, expected[0].images)
    assert torch.equal(test.labels, expected[1].labels)
    assert train.classes == [c.decode() for c in helpers.CIFAR10_NAMES]


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG file that claims width x height pixels in a few dozen bytes (no decodable data)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


def _image_folder(root: Path, side: int = 8) -> Path:
    for c in "ab":
        for i in range(3):
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((side, side), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def _read_with(reader: str, root: Path) -> None:
    if reader == "datm data":
        data.load(DataConfig(name="imagefolder", root=str(root), channels=1, im_size=8))
    elif reader == "evaluate --from":
        sets.read_set(root, ["a", "b"], (1, 8, 8))
    else:
        from cli import init

        init.inspect(str(root))


READERS = ["datm data", "evaluate --from", "datm init"]


@pytest.mark.parametrize("reader", READERS)
def test_an_image_too_large_to_decode_is_refused_from_its_header(tmp_path, reader):
    """20000 x 20000 claimed by a 100-byte file: PIL's DecompressionBombError is no OSError,
    and was a traceback from every reader."""
    root = _image_folder(tmp_path / "set")
    _png_header(root / "b" / "0.png", 20000, 20000)  # the first of its class: init looks at it
    with pytest.raises(UserError, match=r"0\.png is 20000 x 20000 pixels, more than the "
                                        r"50000000 datm decodes \(DATM_MAX_IMAGE_PIXELS"):
        _read_with(reader, root)


@pytest.mark.parametrize("reader", READERS)
def test_any_failure_to_decode_an_image_is_a_user_error(tmp_path, reader):
    root = _image_folder(tmp_path / "set")
    (root / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))  # a broken header

    with pytest.raises(UserError, match=r"cannot read image .*0\.png"):
        _read_with(reader, root)


def test_a_decoder_error_of_any_type_is_a_data_error(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "set")

    def fails(*_args, **_kwargs):
        raise SyntaxError("broken PNG file")  # what some of PIL's plugins raise

    monkeypatch.setattr(Image.Image, "convert", fails)
    with pytest.raises(DataError, match="cannot read image .*SyntaxError: broken PNG file"):
        data.load(DataConfig(name="imagefolder", root=str(root), channels=1, im_size=8))


def test_the_pixel_limit_is_stated_and_configurable(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "set", side=16)
    config = DataConfig(name="imagefolder", root=str(root), channels=1, im_size=8)
    assert data.load(config)[0].images.shape[0] > 0
    monkeypatch.setenv(data.MAX_PIXELS_ENV, "100")
    with pytest.raises(DataError, match="16 x 16 pixels, more than the 100 datm decodes"):
        data.load(config)
    monkeypatch.setenv(data.MAX_PIXELS_ENV, "lots")
    with pytest.raises(DataError, match="DATM_MAX_IMAGE_PIXELS must be a whole number"):
        data.load(config)


def test_damaged_fashion_mnist_and_tiny_imagenet_files_are_data_errors(tmp_path):
    raw = helpers.make_fashion_mnist(tmp_path / "f", n_train=10, n_test=10)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="cannot read .*train-images-idx3-ubyte.gz"):
        data.load(DataConfig(name="fashion_mnist", root=str(tmp_path / "f")))
    base = tmp_path / "t" / "tiny-imagenet-200"
    for wnid in ("n01", "n02"):
        (base / "train" / wnid).mkdir(parents=True)
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(base / "train" / wnid / "0.png")
    (base / "words.txt").write_bytes(b"n01\t\xff\xfe not utf-8\n")
    with pytest.raises(DataError, match="cannot read .*words.txt"):
        data.load(DataConfig(name="tiny_imagenet", root=str(tmp_path / "t")))


@pytest.mark.slow
def test_datm_init_on_an_image_bomb_is_one_line(tmp_path):
    root = _image_folder(tmp_path / "set")
    _png_header(root / "a" / "0.png", 20000, 20000)
    result = helpers.datm("init", str(root), "--dir", str(tmp_path / "project"), cwd=tmp_path)
    lines = helpers.error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, helpers.describe(result)
    assert lines[0].startswith("error:") and "20000 x 20000 pixels" in lines[0]


# --- 3. a disk that refuses -----------------------------------------------------------------------

def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_full_disk_under_safetensors_is_one_line_and_keeps_the_artifact(tmp_path, monkeypatch,
                                                                          capsys):
    """safetensors reports ENOSPC as a SafetensorError, which was a traceback."""
    from safetensors import SafetensorError

    target = tmp_path / "artifacts" / "zca.safetensors"
    artifacts.save(target, {"x": torch.arange(4.0)}, "zca", {"enabled": True})
    before = target.read_bytes()

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half an artifact")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(artifacts, "save_file", full)
    code = common.guarded(lambda: artifacts.save(target, {"x": torch.zeros(4)}, "zca"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot write {target}: No space left on device: free space")
    assert target.read_bytes() == before and _temps(target.parent) == []


@pytest.mark.parametrize("refusal", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_refused_rename_is_one_line_and_keeps_the_artifact(tmp_path, monkeypatch, capsys,
                                                            refusal):
    from datm.pipeline.project import write_json

    target = tmp_path / "metrics" / "evaluate" / "ipc_1.json"
    write_json(target, {"acc": 0.5})
    before = target.read_bytes()

    def refuse(src, dst):
        raise OSError(refusal, os.strerror(refusal), src, None, dst)

    monkeypatch.setattr(os, "replace", refuse)
    code = common.guarded(lambda: write_json(target, {"acc": 0.9}))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{target}: {os.strerror(refusal)}: " in err and "run the same command again" in err
    assert err.endswith("(finished work is kept)")
    assert target.read_bytes() == before and _temps(target.parent) == []


def test_a_full_disk_under_a_lock_names_the_lock_file(tmp_path, monkeypatch, capsys):
    from datm import locks

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    lock = tmp_path / "checkpoints" / "ipc_1.lock"

    def hold() -> None:
        with locks.hold(lock, "IPC 1 is being distilled"):
            pass

    assert common.guarded(hold) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write {lock}: No space left")


def test_a_bug_that_raises_an_oserror_still_shows_its_traceback():
    def bug() -> None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "nowhere")

    with pytest.raises(FileNotFoundError):
        common.guarded(bug)


@pytest.fixture
def read_only(monkeypatch):
    """A read-only file system under the folders appended to the returned list: creating,
    writing, renaming or removing anything there fails with EROFS, as on a `mount -o ro` (the
    tests run as root, whom chmod does not stop)."""
    roots: list[Path] = []
    real = {name: getattr(os, name) for name in ("open", "mkdir", "replace", "rename", "unlink")}
    real_open = builtins.open

    def inside(path) -> bool:
        try:
            resolved = Path(os.fsdecode(path)).resolve()
        except TypeError:
            return False
        return any(resolved == r or r in resolved.parents for r in roots)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        if flags & writes and inside(path):
            refuse(path)
        return real["open"](path, flags, mode, dir_fd=dir_fd)

    def mkdir(path, mode=0o777, *, dir_fd=None):
        if inside(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
            refuse(path)
        return real["mkdir"](path, mode, dir_fd=dir_fd)

    def two(name):
        def call(src, dst, **kwargs):
            for path in (src, dst):
                if inside(path):
                    refuse(path)
            return real[name](src, dst, **kwargs)
        return call

    def unlink(path, *, dir_fd=None):
        if inside(path):
            refuse(path)
        return real["unlink"](path, dir_fd=dir_fd)

    def py_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not isinstance(file, int) and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    for name, fn in (("open", os_open), ("mkdir", mkdir), ("replace", two("replace")),
                     ("rename", two("rename")), ("unlink", unlink)):
        monkeypatch.setattr(os, name, fn)
    monkeypatch.setattr(builtins, "open", py_open)
    monkeypatch.setattr(io, "open", py_open)
    return roots


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("stage", ["distill", "evaluate", "summary"])
def test_a_stage_in_a_read_only_project_is_one_line_and_changes_nothing(tmp_path, monkeypatch,
                                                                        capsys, read_only, stage):
    from datm import pipeline
    from datm.config import Params

    monkeypatch.setenv("DATM_TRACKING", "off")
    monkeypatch.setenv(launch.RANKS_ENV, "1")
    raw = helpers.tiny_params()  # one IPC: what the summary needs is one evaluation
    raw["distill"]["ipcs"], raw["distill"]["ipc"] = [1], {1: raw["distill"]["ipc"][1]}
    raw["evaluate"].update(cross_ipcs=[], decompose_ipcs=[], ipc={1: {}})
    paths = helpers.tiny_project(tmp_path, raw)
    if stage != "distill":
        pipeline.distill_ipc(Params.from_dict(raw), paths, 1)
    if stage == "summary":
        pipeline.write_json(paths.evaluation(1),
                            pipeline.evaluate_ipc(Params.from_dict(raw), paths, 1))
    before = _tree(tmp_path)
    read_only.append(tmp_path.resolve())
    params, root = str(tmp_path / "params.yaml"), str(tmp_path)
    if stage == "distill":
        from stages import distill

        code = distill.start(1, params, root)
    elif stage == "evaluate":
        from stages import evaluate

        code = evaluate.start("evaluate", 1, params, root)
    else:
        from stages import summary

        code = common.guarded(lambda: summary.run(params, root))
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert code == 2, err
    assert len(errors) == 1 and errors == err[-1:], err  # after the progress of its work
    assert errors[0].startswith(f"error: cannot write {tmp_path}"), err
    assert "Read-only file system: the file system is read-only" in errors[0], err
    read_only.clear()
    assert _tree(tmp_path) == before


def test_a_refused_write_outside_any_stage_is_one_line_from_the_cli(monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app
    from stages import distill

    def full(*_args, **_kwargs) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "checkpoints/ipc_2.lock")

    monkeypatch.setattr(distill, "start", full)
    result = CliRunner().invoke(app, ["distill", "--ipc", "2"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: cannot write checkpoints/ipc_2.lock: No space left")


# --- 5. export --force replaces only what datm wrote -------------------------------------------

def _export(out: Path, fmt: str = "safetensors", value: float = 0.25,
            force: bool = False) -> Path:
    pixels = torch.full((3, 1, 4, 4), value)
    return export_mod.export(pixels, pixels, torch.zeros(3, 3), value, ["a", "b", "c"], out, fmt,
                             {"dataset": "t", "ipc": 1}, force=force)


def test_force_refuses_a_folder_whose_card_lists_no_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / export_mod.CARD).write_text("{}")
    (out / "thesis.tex").write_text("a user's own file")
    before = _tree(out)
    with pytest.raises(export_mod.ExportError, match="lists no digests of its files .*remove "
                                                     "or move it by hand"):
        _export(out, force=True)
    assert _tree(out) == before


@pytest.mark.parametrize("fmt", ["safetensors", "png"])
@pytest.mark.parametrize("change, fragment", [
    (lambda out: (out / "notes.txt").write_text("mine"), "notes.txt is not one of its files"),
    (lambda out: (out / "data").mkdir(), "data/ is not one of its folders"),
    (lambda out: (out / "README.md").write_text("edited"), "README.md changed since the export"),
    (lambda out: (out / "README.md").unlink(), "README.md is missing"),
    (lambda out: (out / "link").symlink_to("/etc"), "link is a symbolic link"),
])
def test_force_refuses_an_export_that_is_no_longer_only_datms(tmp_path, fmt, change, fragment):
    out = _export(tmp_path / "export", fmt)
    change(out)
    before = _tree(out)
    with pytest.raises(export_mod.ExportError, match=f"is not the export its .*{fragment}"):
        _export(out, fmt, 0.5, force=True)
    assert _tree(out) == before


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "pt", "png"])
def test_force_replaces_datms_own_export(tmp_path, fmt):
    out = _export(tmp_path / "export", fmt)
    card = json.loads((out / export_mod.CARD).read_text())
    assert set(card["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*")
                                  if p.is_file()} - {export_mod.CARD}
    _export(out, fmt, 0.5, force=True)
    assert export_mod.read(out).lr == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_recorded_card_still_lists_its_files(tmp_path):
    """--record rewrites the card and README: the listing follows, and --force still works."""
    out = _export(tmp_path / "export", "png")
    card = json.loads((out / export_mod.CARD).read_text())
    card["accuracy"] = {"distilled": "50.00 ± 0.00 % (1 models)", "measured": "by a test"}
    export_mod._write_card(out, card)
    assert "50.00" in (out / "README.md").read_text()
    _export(out, "png", 0.5, force=True)


# --- 6. SIGTERM, a killed rank, a killed launch -------------------------------------------------

SIGTERM_STAGE = """
import sys, time
from pathlib import Path
from stages import common

def work():
    Path(sys.argv[1]).write_text("working")
    while True:
        time.sleep(0.05)

sys.exit(common.guarded(work))
"""


def test_sigterm_to_a_stage_is_143_and_one_line(tmp_path):
    script = tmp_path / "some_stage.py"
    script.write_text(SIGTERM_STAGE)
    ready = tmp_path / "ready"
    log = tmp_path / "run.log"
    proc = helpers.start([sys.executable, str(script), str(ready)], tmp_path, log)
    try:
        assert helpers.wait_for(ready.exists, timeout=120, proc=proc), log.read_text()
        proc.send_signal(signal.SIGTERM)
        code = helpers.finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert code == 143, log.read_text()
    assert lines == ["terminated (SIGTERM): some_stage stopped; finished work is kept: run the "
                     "same command again to resume"], lines


@pytest.fixture
def sigterm_restored():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_in_a_deferred_block_is_raised_when_it_ends(sigterm_restored):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    interrupts.terminate_gently()
    ended = []
    with pytest.raises(interrupts.Terminated):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            ended.append("the block ran to its end")
    assert ended


class _Failure:
    def __init__(self, exitcode: int, pid: int, timestamp: int) -> None:
        self.exitcode, self.pid, self.timestamp = exitcode, pid, timestamp


class _ChildFailed:
    def __init__(self, failures: dict[int, _Failure]) -> None:
        self.failures = failures

    def get_first_failure(self):
        rank = min(self.failures, key=lambda r: self.failures[r].timestamp)
        return rank, self.failures[rank]


def test_a_killed_rank_is_the_one_line_not_the_peers_it_left(tmp_path, capsys):
    """Rank 0 saw its peer vanish (gloo's paragraph) a moment before torchrun saw rank 1
    killed: the kill is the cause, and the one line."""
    (tmp_path / "rank0.err").write_text("lost the other processes (Connection closed by peer)")
    failed = _ChildFailed({0: _Failure(2, 11, 100), 1: _Failure(-signal.SIGKILL, 12, 101)})
    assert launch._rank_failed(failed, tmp_path) == 128 + signal.SIGKILL
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: rank 1 (pid 12) was killed by SIGKILL, so the others were stopped: "
                   "run the same command again to resume"]


def test_a_rank_torchrun_stopped_is_not_the_cause_beside_a_ranks_own_error(tmp_path, capsys):
    """Rank 0 refused the set (exit 2, its line saved); torchrun then stopped rank 1 with
    SIGTERM while it was still starting up (exit -15, CI's race): rank 0's line and exit 2."""
    (tmp_path / "rank0.err").write_text("images hold NaN or inf")
    failed = _ChildFailed({1: _Failure(-signal.SIGTERM, 12, 100), 0: _Failure(2, 11, 100)})
    assert launch._rank_failed(failed, tmp_path) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: images hold NaN or inf"]


def test_a_rank_killed_by_sigterm_is_the_cause_when_the_others_only_lost_it(tmp_path, capsys):
    """SIGTERM sent to rank 1 alone: rank 0 only lost its peer, so the kill is the one line."""
    (tmp_path / "rank0.err").write_text(f"{launch.PEERS_LOST} (Connection closed by peer)")
    failed = _ChildFailed({0: _Failure(2, 11, 100), 1: _Failure(-signal.SIGTERM, 12, 100)})
    assert launch._rank_failed(failed, tmp_path) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: rank 1 (pid 12) was killed by SIGTERM, so the others were stopped: run the same "
        "command again to resume"]


def test_gloos_paragraph_is_its_reason_in_a_few_words():
    exc = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] "
                       "Connection closed by peer [127.0.0.1]:14211. This is typically caused by "
                       "a remote worker crashing. Check the logs of the remote worker before "
                       "reporting an error. GLHF! 🏖️")
    assert launch._peer_lost(exc) == "Connection closed by peer [127.0.0.1]:14211"


@pytest.mark.parametrize("code, received, line, exit_code", [
    (-signal.SIGKILL, [], "error: the launch of stages.distill (pid 7) was killed by SIGKILL", 137),
    (-signal.SIGTERM, [], "terminated (SIGTERM): ", 143),
    (-signal.SIGTERM, [signal.SIGTERM], "terminated (SIGTERM): ", 143),
    (143, [signal.SIGTERM], "terminated (SIGTERM): ", 143),
    (130, [signal.SIGINT], "interrupted: ", 130),
])
def test_the_stage_process_says_how_its_launch_ended(capsys, code, received, line, exit_code):
    assert launch._launch_ended(code, received, 7, "stages.distill") == exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["rank 1", "the launch", "the stage"])
def test_a_two_process_distill_killed_anywhere_ends_in_one_datm_line(tmp_path, kill):
    """SIGKILL to rank 1 (rank 0 saw gloo's paragraph first), SIGKILL to the launch (which
    could say nothing: exit 137 alone), SIGTERM to the stage (143 alone): one line each."""
    import psutil
    from test_launch import launch_params, stage, workers

    raw = launch_params(distill=2)
    raw["distill"]["ipc"][2].update(iterations=100_000)
    raw["distill"]["defaults"]["checkpoint_every"] = 1
    project = tmp_path / "project"
    paths = helpers.tiny_project(project, raw)
    log = tmp_path / "run.log"
    proc = helpers.start(stage("distill", "--ipc", "2"), project, log, DATM_DIST_TIMEOUT_S="10")
    try:
        assert helpers.wait_for(paths.checkpoint(2).is_file, timeout=240, proc=proc), \
            log.read_text()
        if kill == "rank 1":
            workers(proc)[1].send_signal(signal.SIGKILL)
        elif kill == "the launch":
            psutil.Process(proc.pid).children()[0].send_signal(signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGTERM)
        code = helpers.finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("error:", "terminated"))]
    assert len(said) == 1 and said == lines[-1:], lines
    assert "Traceback" not in log.read_text() and "gloo" not in log.read_text(), lines
    expected = {"rank 1": (137, "error: rank 1 ("), "the launch": (137, "error: the launch of"),
                "the stage": (143, "terminated (SIGTERM): distill stopped")}[kill]
    assert code == expected[0] and said[0].startswith(expected[1]), lines
    assert not workers(proc)
