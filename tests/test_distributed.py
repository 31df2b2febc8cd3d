"""datm.distributed: W gloo processes compute what one process computes.

Two kinds of ranks:
* threads of the test process (`ThreadGroup`: a sum through shared memory): the maths of the
  split (matching, distillation) for W = 2 and 3 in well under a second, in the fast suite;
* processes on gloo (slow: each launch imports torch): this file run as a script,
  `python tests/test_distributed.py SCENARIO OUT [ARG]`, with torchrun's variables (RANK,
  WORLD_SIZE, MASTER_ADDR, ...) set here by hand, or by torchrun itself in the two-node test.
  Each rank saves what it computed to OUT/rank<r>.pt; the test compares that with the same
  computation done in the test process (one process, no env vars), on 127.0.0.1, on the CPU.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` as a script too

import helpers  # noqa: E402
from helpers import TINY_AUG, TINY_SPEC  # noqa: E402

from datm import distributed  # noqa: E402
from datm.config import DistillConfig, EvalConfig, ExpertConfig  # noqa: E402
from datm.distill import Distiller, DistillError, Selection  # noqa: E402
from datm.distributed import SINGLE, Group, init_from_env, shard, shard_range  # noqa: E402
from datm.evaluate import evaluate_set  # noqa: E402
from datm.experts import ExpertBuffer, train_experts  # noqa: E402
from datm.initialization import initialize  # noqa: E402
from datm.matching import make_plan, recompute, unroll  # noqa: E402
from datm.networks import FlatModel  # noqa: E402

THIS = Path(__file__).resolve()
WORLD = 2
LAUNCH_TIMEOUT_S = 180   # a launch that takes longer hangs: fail instead of waiting forever
NUM_CLASSES = 3


# --- what both the ranks and the test process compute ----------------------------------------

def tiny_data(dtype: torch.dtype = torch.float32):
    """conftest's tiny_data: 64 + 30 learnable 1x8x8 images of 3 classes."""
    x, y = helpers.blobs(94, NUM_CLASSES, channels=1, size=8, seed=0)
    x = x.to(dtype)
    return x[:64], y[:64], x[64:], y[64:]


EXPERTS = ExpertConfig(num_experts=3, epochs=2, lr=0.05, batch=16, seed=0)
BATCHED = ExpertConfig(num_experts=3, epochs=2, lr=0.05, batch=16, seed=0, group=2)  # vmap 2
BUFFER = ExpertConfig(num_experts=3, epochs=3, lr=0.05, batch=16, seed=0)
# 6 images in batches of 5, 1, 5: uneven parts (3 + 2; 2 + 2 + 1) and empty ones (1 + 0).
DISTILL = DistillConfig(ipc=2, syn_steps=3, expert_epochs=1, min_start_epoch=0,
                        max_start_epoch=2, batch_syn=5, lr_img=10.0, lr_y=2.0, lr_lr=1e-3,
                        iterations=4, threshold=10.0, checkpoint_every=2, seed=0,
                        select_every=2, select_epochs=2, select_models=3)
SELECT_EVAL = EvalConfig(batch=4, lr_scale=1.0)
EVAL = EvalConfig(batch=9)
# (n_syn, batch, steps): batches 3, 3, 1, 3 (odd, and one smaller than W); 6 by 6; 5 whole.
MATCH_CASES = [(7, 3, 4), (6, 6, 2), (5, 5, 3)]


@contextmanager
def float64():
    """Float64 by default: networks, draws and lr, so one and two processes agree to 1e-10."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def match_problem(seed: int, n_syn: int, batch: int, steps: int):
    """A float64 matching problem with DSA: (fm, images, labels, lr, start, target, plan, aug)."""
    fm = FlatModel(TINY_SPEC)
    g = torch.Generator().manual_seed(seed)
    start = fm.init(seed).double()
    target = fm.init(seed + 1000).double() * 0.3 + start * 0.7
    images = torch.randn(n_syn, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randn(n_syn, NUM_CLASSES, generator=g, dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64)
    plan = make_plan(n_syn, batch, steps, 8, TINY_AUG, g)
    assert all(d is not None for d in plan.draws)
    return fm, images, labels, lr, start, target, plan, TINY_AUG


def match_problems() -> list[tuple]:
    """MATCH_CASES, then one to skip. Made once up front: FlatModel.init seeds torch's global
    RNG, which threads as ranks must not race on."""
    return [match_problem(seed, *case) for seed, case in enumerate(MATCH_CASES + [(7, 3, 4)])]


def match_results(group: Group, problems: list[tuple] | None = None) -> list[dict]:
    problems = problems or match_problems()
    out = []
    for args in problems[:-1]:
        r = recompute(*args, group=group)
        out.append({"loss": r.loss, "images": r.grad_images, "labels": r.grad_labels,
                    "lr": r.grad_lr})
    full = recompute(*problems[-1], group=group)
    skipped = recompute(*problems[-1], skip_above=full.loss / 2, group=group)
    out.append({"loss": skipped.loss, "has_grad": skipped.has_grad})
    return out


def distill_run(buffer_dir: Path, group: Group, checkpoint: Path | None = None,
                select: bool = True) -> dict:
    """A few whole iterations, with selection (its evaluation is sharded too) unless `select`
    is off. Call it under float64() (not entered here: threads as ranks share the default)."""
    x, y, _, _ = tiny_data(torch.float64)
    buffer = ExpertBuffer.open(buffer_dir)
    selection = Selection(TINY_SPEC, SELECT_EVAL, TINY_AUG, x[40:], y[40:])
    cfg = DISTILL if select else replace(DISTILL, select_every=0)
    d = Distiller.create(cfg, buffer, x[:40], y[:40], TINY_AUG, selection, group=group)
    d.run(checkpoint=checkpoint)
    return {"images": d.images, "labels": d.labels, "lr": d.lr, "history": d.history,
            "selections": d.selections, "best_iteration": d.best and d.best.iteration,
            "rng": d.generator.get_state(), "m_images": d.momenta.images}


def evaluation(group: Group) -> dict:
    x, y, xt, yt = tiny_data()
    return evaluate_set(TINY_SPEC, x[:9], y[:9], 0.01, 3, 3, EVAL, TINY_AUG, xt, yt, seed=0,
                        group=group)


def make_buffer(out: Path) -> Path:
    """The float64 expert buffer the distillation runs read (made by one process)."""
    with float64():
        x, y, xt, yt = tiny_data(torch.float64)
        train_experts(out, TINY_SPEC, x, y, xt, yt, BUFFER, TINY_AUG, data_id="tiny64")
    return out


# --- ranks as threads ----------------------------------------------------------------------------

class _Shared:
    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world


@dataclass(frozen=True)
class ThreadGroup(Group):
    """Rank `rank` of W threads of this process: the same sum as all-reduce, by shared memory."""

    shared: _Shared | None = None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        s = self.shared
        s.slots[self.rank] = tensor.detach().clone()
        s.barrier.wait()
        total = s.slots[0].clone()
        for part in s.slots[1:]:
            total += part  # in rank order on every rank: the same bits everywhere
        s.barrier.wait()  # every rank has read the slots before any writes the next ones
        return tensor.copy_(total)


def in_threads(world: int, fn) -> list:
    """fn(group) on each of `world` threads as ranks; their results in rank order."""
    shared, results, errors = _Shared(world), [None] * world, []

    def run(rank: int) -> None:
        try:
            results[rank] = fn(ThreadGroup(rank, world, shared=shared))
        except BaseException as exc:  # re-raised below
            errors.append(exc)
            shared.barrier.abort()  # the others stop waiting for this rank

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# --- the ranks as processes (this file run as a script) -------------------------------------------

@dataclass(frozen=True)
class FailingGroup(Group):
    """Says when each collective is done; then dies (os._exit), hangs, or goes on ("none")."""

    how: str = "none"

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = super().all_reduce_sum(tensor)
        print(f"collective done at {time.time():.3f}", file=sys.stderr, flush=True)
        if self.how == "exit":
            os._exit(3)
        if self.how == "hang":
            time.sleep(600)
        return out


def _rank_all(group: Group, out: Path, buffer_dir: Path) -> dict:
    trained: list[int] = []

    def on_event(e: dict) -> None:
        if e["event"] == "expert":
            trained.append(e["index"])

    x, y, xt, yt = tiny_data()
    train_experts(out / "experts", TINY_SPEC, x, y, xt, yt, EXPERTS, TINY_AUG, data_id="tiny",
                  callback=on_event, group=group)
    train_experts(out / "batched", TINY_SPEC, x, y, xt, yt, BATCHED, TINY_AUG, data_id="tiny",
                  group=group)
    with float64(), counting_parts() as share:
        distilled = distill_run(buffer_dir, group, out / f"checkpoint_{group.rank}.st")
    return {"trained": trained, "match": match_results(group), "distill": distilled,
            "distill_share": share, "evaluate": evaluation(group),
            "threads": torch.get_num_threads()}


@contextmanager
def counting_parts():
    """The batch images this process's matching computed ([count], filled on exit): every
    step's part of the batch (datm.matching._part), in the forward and the backward sweep."""
    from datm import matching

    real, seen, share = matching._part, [], []

    def counted(idx, draw, group):
        part = real(idx, draw, group)
        seen.append(len(part[0]))
        return part

    matching._part = counted
    try:
        yield share
    finally:
        matching._part = real
        share.append(sum(seen))


def _rank_fail(group: Group, how: str, buffer_dir: Path) -> None:
    """Rank 1 fails after its first collective; rank 0 goes on distilling (one collective
    per unrolled step) and must fail within the group's timeout."""
    group = FailingGroup(group.rank, group.world, group.local_rank, group.local_world,
                         group.device, how=how if group.rank == 1 else "none")
    cfg = replace(DISTILL, iterations=10**6, select_every=0)
    with float64():
        x, y, _, _ = tiny_data(torch.float64)
        d = Distiller.create(cfg, ExpertBuffer.open(buffer_dir), x, y, TINY_AUG, group=group)
        d.run()


def main(argv: list[str]) -> int:
    scenario, out = argv[0], Path(argv[1])
    timeout_s = float(os.environ.get("DATM_TEST_TIMEOUT_S", "60"))
    group = init_from_env(timeout_s=timeout_s)
    assert group.world == WORLD and torch.distributed.is_initialized(), group
    if scenario == "all":
        result = _rank_all(group, out, Path(argv[2]))
    elif scenario == "distill":
        with float64():
            result = {"distill": distill_run(Path(argv[2]), group)}
    else:
        _rank_fail(group, scenario, Path(argv[2]))
        return 0
    torch.save({"rank": group.rank, **result}, out / f"rank{group.rank}.pt")
    group.close()
    return 0


# --- launching ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(scenario: str, out: Path, *args: str, world: int = WORLD,
                **env: str) -> list[subprocess.Popen]:
    """`world` ranks of this file, with the variables torchrun would set on one machine."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        rank_env = helpers.base_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                    LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                    MASTER_PORT=port, **env)
        procs.append(subprocess.Popen([sys.executable, str(THIS), scenario, str(out), *args],
                                      env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT_S) -> list[tuple]:
    """(returncode, stdout, stderr) of each; kills all of them if one outlives `timeout`."""
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def ranks_output(out: Path, world: int = WORLD) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def buffer64(tmp_path_factory) -> Path:
    return make_buffer(tmp_path_factory.mktemp("buffer64"))


@pytest.fixture(scope="module")
def reference_experts(tmp_path_factory) -> Path:
    """One process's experts: <out>/experts one at a time, <out>/batched in vmap groups of 2."""
    out = tmp_path_factory.mktemp("experts1")
    x, y, xt, yt = tiny_data()
    train_experts(out / "experts", TINY_SPEC, x, y, xt, yt, EXPERTS, TINY_AUG, data_id="tiny")
    train_experts(out / "batched", TINY_SPEC, x, y, xt, yt, BATCHED, TINY_AUG, data_id="tiny")
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, buffer64, reference_experts) -> tuple[Path, list[dict]]:
    """One launch of 2 ranks computing everything the tests below compare.

    Expert 1 is already there (copied from one process's run): the ranks must train only the
    missing 0 and 2, one each, as a resumed run would.
    """
    out = tmp_path_factory.mktemp("two_ranks")
    (out / "experts").mkdir()
    name = "expert_001.safetensors"
    (out / "experts" / name).write_bytes((reference_experts / "experts" / name).read_bytes())
    results = finish(start_ranks("all", out, str(buffer64)))
    for rank, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"rank {rank} exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return out, ranks_output(out)


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-10) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, what
    scale = float(b.abs().max())
    assert scale > 0, what
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3g} vs scale {scale:.3g}"


# --- one process, no env vars: the default path ------------------------------------------------

def test_without_torchrun_everything_is_one_process():
    group = init_from_env(env={})
    assert group == SINGLE and (group.rank, group.world) == (0, 1)
    assert group.is_main and not group.distributed
    assert not torch.distributed.is_initialized()
    t = torch.arange(3.0)
    assert group.all_reduce_sum(t) is t and torch.equal(t, torch.arange(3.0))
    assert group.gather_floats({0: 0.5, 1: 0.25}, 2) == [0.5, 0.25]
    group.check_same("anything", torch.tensor([float("nan")]))
    group.barrier()
    group.close()
    assert list(group.shard(range(5))) == [0, 1, 2, 3, 4]
    # torchrun with one process: still no process group
    one = init_from_env(env={"RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"})
    assert one.world == 1 and not torch.distributed.is_initialized()


def test_each_rank_gets_its_share_of_the_cores_unless_omp_num_threads_is_set():
    before = torch.get_num_threads()
    try:
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
        init_from_env(env=env)
        assert torch.get_num_threads() == max(1, distributed.cores() // 2)
        torch.set_num_threads(1)
        init_from_env(env={**env, "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1"})
        assert torch.get_num_threads() == 1  # the variable wins over the share
        init_from_env(env=env, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 1000])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_item_once(n, world):
    parts = [shard_range(n, r, world) for r in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))  # contiguous, in order
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(i for r in range(world) for i in shard(range(n), r, world)) == list(range(n))
    assert list(shard(range(n), world - 1, world)) == list(range(world - 1, n, world))


def test_unroll_and_batch_norm_refuse_several_ranks(tiny_buffer, tiny_data):
    """Refused before any collective, so a Group without a process group shows it."""
    two = Group(rank=0, world=2)
    args = match_problem(0, 5, 2, 2)
    with pytest.raises(ValueError, match="unroll.*recompute"):
        unroll(*args, group=two)
    bn = FlatModel(replace(TINY_SPEC, norm="batch"))
    with pytest.raises(ValueError, match="batch norm"):
        recompute(bn, *args[1:], group=two)
    x, y, _, _ = tiny_data
    with pytest.raises(DistillError, match="recompute"):
        Distiller.create(replace(DISTILL, mode="unroll", select_every=0), tiny_buffer, x, y,
                         TINY_AUG, group=two)


def assert_same_gradients(ranks: list[list[dict]], one: list[dict]) -> None:
    for rank in ranks:
        for case, (mine, ref) in enumerate(zip(rank[:-1], one[:-1])):
            assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-12), case
            for name in ("images", "labels", "lr"):
                assert_close(mine[name], ref[name], f"case {case} {name}")
        # the same skip decision on every rank and in one process
        assert not rank[-1]["has_grad"] and not one[-1]["has_grad"]
        assert rank[-1]["loss"] == pytest.approx(one[-1]["loss"], rel=1e-12)
    for other in ranks[1:]:  # one result, bit for bit, on every rank
        for a, b in zip(ranks[0][:-1], other[:-1]):
            assert a["loss"] == b["loss"]
            assert all(torch.equal(a[k], b[k]) for k in ("images", "labels", "lr"))


def assert_same_distillation(ranks: list[dict], one: dict) -> None:
    for got in ranks:
        for name in ("images", "labels", "lr", "m_images"):
            assert_close(got[name], one[name], name)
        assert torch.equal(got["rng"], one["rng"])  # the same plans were drawn
        # iteration, start epoch, upper bound, skipped: the same draws and decisions
        exact = lambda rows: [(r[0], r[2], r[3], r[5]) for r in rows]  # noqa: E731
        assert exact(got["history"]) == exact(one["history"])
        assert [r[1] for r in got["history"]] == pytest.approx([r[1] for r in one["history"]],
                                                               rel=1e-10)
        assert got["selections"] == one["selections"]  # sharded evaluation: same accuracies
        assert got["best_iteration"] == one["best_iteration"]
    for other in ranks[1:]:  # one state on every rank, bit for bit
        assert all(torch.equal(ranks[0][k], other[k]) for k in ("images", "labels", "lr"))


# --- ranks as threads against one process ------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_ranks_give_the_one_process_matching_gradient(world):
    """float64, DSA on; batches of 3, 1 (parts of 2 + 1 + 0, 1 + 0 + 0), 6 and 5: to 1e-10."""
    problems = match_problems()
    one = match_results(SINGLE, problems)
    # A FlatModel per rank: functional_call swaps the parameters of one shared module, which
    # threads must not share (processes never do).
    own = [[(FlatModel(TINY_SPEC), *args[1:]) for args in problems] for _ in range(world)]
    assert_same_gradients(in_threads(world, lambda g: match_results(g, own[g.rank])), one)


def test_ranks_run_the_one_process_distillation(buffer64):
    with float64():
        one = distill_run(buffer64, SINGLE, select=False)
        ranks = in_threads(3, lambda g: distill_run(buffer64, g, select=False))
    assert one["history"][-1][-1] == 0 and len(one["history"]) == DISTILL.iterations
    assert_same_distillation(ranks, one)


@pytest.mark.parametrize("init", ["real_hard", "real_correct"])
def test_ranks_share_the_experts_passes_of_an_initialization(buffer64, monkeypatch, init):
    """real_hard's judgement and the soft labels: each of 3 ranks sends about a third of the
    images through the experts, and every rank gets one process's images, labels and report,
    bit for bit (real_correct's scan stays whole on every rank; its labels are shared)."""
    local, seen = threading.local(), collections.Counter()
    real = FlatModel.__call__

    def counted(fm, theta, x):
        seen[local.who] += x.shape[0]
        return real(fm, theta, x)

    def init_on(group: Group):
        local.who = "one" if group is SINGLE else group.rank
        return initialize(cfg, buffer, x, y, torch.Generator().manual_seed(0), chunk=4,
                          group=group)

    monkeypatch.setattr(FlatModel, "__call__", counted)
    cfg = replace(DISTILL, init=init, labels="expert", ipc=5)
    with float64():
        x, y, _, _ = tiny_data(torch.float64)
        buffer = ExpertBuffer.open(buffer64)
        one = init_on(SINGLE)
        ranks = in_threads(3, init_on)
    for images, labels, report in ranks:
        assert torch.equal(images, one[0]) and torch.equal(labels, one[1]) and report == one[2]
    shares = [seen[rank] for rank in range(3)]
    if init == "real_hard":
        assert sum(shares) == seen["one"] and max(shares) <= seen["one"] / 2, (shares, seen)
    else:
        assert max(shares) < seen["one"], (shares, seen)


# --- two ranks as gloo processes against one process -------------------------------------------

@pytest.mark.slow
def test_two_ranks_write_byte_identical_experts(two_ranks, reference_experts):
    out, ranks = two_ranks
    assert ranks[0]["trained"] == [0] and ranks[1]["trained"] == [2]  # 1 was there: resumed
    for folder in ("experts", "batched"):  # batched: rank 0 trains [0, 1] as one model, 1 [2]
        files = sorted(p.name for p in (out / folder).iterdir())
        assert files == sorted(p.name for p in (reference_experts / folder).iterdir())
        assert len(files) == EXPERTS.num_experts
        for name in files:
            mine, one = (out / folder / name).read_bytes(), (reference_experts / folder / name)
            assert mine == one.read_bytes(), (folder, name)


@pytest.mark.slow
def test_two_ranks_give_the_one_process_matching_gradient(two_ranks):
    """float64, DSA on, batches of 3 (2 + 1 per rank), 1 (1 + 0), 6 and 5: to 1e-10."""
    _, ranks = two_ranks
    assert_same_gradients([rank["match"] for rank in ranks], match_results(SINGLE))


@pytest.mark.slow
def test_each_of_two_ranks_computes_its_share_of_every_batch(two_ranks, buffer64):
    """Equal results alone would not tell two ranks from one rank doing all the work: each
    rank's matching handled part of the batches, and the parts add up to the one process's."""
    _, ranks = two_ranks
    with float64(), counting_parts() as one:
        distill_run(buffer64, SINGLE)
    shares = [rank["distill_share"][0] for rank in ranks]
    assert all(s > 0 for s in shares) and sum(shares) == one[0], (shares, one)
    assert abs(shares[0] - shares[1]) <= shares[0] // 2  # about half each


@pytest.mark.slow
def test_two_ranks_run_the_one_process_distillation(two_ranks, buffer64):
    """4 iterations with selection in float64: equal to 1e-10 (not bitwise: the sum of two
    half-batch gradients rounds differently from one full-batch gradient)."""
    out, ranks = two_ranks
    with float64():
        one = distill_run(buffer64, SINGLE)
    assert_same_distillation([rank["distill"] for rank in ranks], one)
    assert (out / "checkpoint_0.st").is_file() and not (out / "checkpoint_1.st").exists()


@pytest.mark.slow
def test_two_ranks_evaluate_like_one_process(two_ranks):
    _, ranks = two_ranks
    one = evaluation(SINGLE)
    assert len(set(one["accs"])) > 1  # distinct models: the order matters
    for rank in ranks:
        got = rank["evaluate"]
        assert got["accs"] == one["accs"]
        assert (got["mean"], got["std"]) == (one["mean"], one["std"])
        assert len(got["seconds"]) == 3 and min(got["seconds"]) > 0
    assert ranks[0]["threads"] == ranks[1]["threads"] == 1  # OMP_NUM_THREADS=1 was respected


# --- failures: a dead or stuck rank -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_failed_rank_makes_the_other_fail_within_the_timeout(tmp_path, buffer64, how):
    """Rank 1 dies (os._exit) or hangs right after its first collective; rank 0, distilling,
    must exit non-zero within the collective timeout (3 s here), not wait forever."""
    timeout_s = 3.0
    procs = start_ranks(how, tmp_path, str(buffer64), DATM_TEST_TIMEOUT_S=str(timeout_s))
    rank0 = procs[0]
    try:
        _, stderr = rank0.communicate(timeout=LAUNCH_TIMEOUT_S)
        ended = time.time()
    finally:
        if how == "hang":
            procs[1].kill()  # it sleeps for 10 minutes: rank 0's fate is what is tested
        finish(procs)
    assert rank0.returncode not in (0, None), stderr[-3000:]
    done = [float(line.rsplit(" ", 1)[1]) for line in stderr.splitlines()
            if line.startswith("collective done at")]
    assert done, stderr[-3000:]  # rank 0 got past the first collective, then failed
    # from its last good collective to its exit: the timeout plus the slack of a busy 2-core box
    assert ended - done[-1] < timeout_s + 15, (ended - done[-1], stderr[-3000:])
    if how == "hang":  # a live, silent peer: only the timeout can end the wait
        assert ended - done[-1] >= timeout_s * 0.9 and "Timed out" in stderr, stderr[-3000:]


# --- two torchrun launches as two machines ------------------------------------------------------

@pytest.mark.slow
def test_two_torchrun_nodes_distill_like_one_process(tmp_path, buffer64):
    """`torchrun --nnodes 2 --node-rank 0|1 --nproc-per-node 1` on 127.0.0.1 (static rendezvous
    at MASTER_ADDR:MASTER_PORT), as two machines would be started."""
    port = str(free_port())
    torchrun = str(helpers.VENV_BIN / "torchrun")
    procs = [subprocess.Popen([torchrun, "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                               "--master-port", port, str(THIS), "distill", str(tmp_path),
                               str(buffer64)],
                              env=helpers.base_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for node in range(2)]
    for node, (code, stdout, stderr) in enumerate(finish(procs)):
        assert code == 0, f"node {node} exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    with float64():
        one = distill_run(buffer64, SINGLE)
    for rank in ranks_output(tmp_path):
        for name in ("images", "labels", "lr"):
            assert_close(rank["distill"][name], one[name], name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
