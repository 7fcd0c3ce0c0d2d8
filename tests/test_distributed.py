"""Distributed training (issue 6.4): DDP and FSDP2 on 2 CPU processes (gloo) against one process.

The test runs this file as a script, which spawns 2 ranks with
``torch.multiprocessing.spawn``; each rank writes its results to a folder
and the tests compare them with a single-process reference computed here on
the same global batch with the concatenated kept indices.

Tolerance for gradients/parameters: ``atol=1e-6, rtol=1e-5`` (fp32). Each
rank's backward reduces over its own 2 samples and the all-reduce (DDP) or
reduce-scatter (FSDP2) then sums the two partial gradients and divides by 2,
while the reference reduces over all 4 samples inside one backward: the same
terms summed in a different order, so results differ by a few ulps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import treadfx

from helpers import dit_inputs, random_dit, random_kept

WORLD, GLOBAL_B, N, K, SEED = 2, 4, 16, 8, 3
CFG = dict(depth=5, width_per_head=8, heads=2, patch=2, grid=4)
ROUTE = dict(start=1, end=3, ratio=0.5)
TOL = dict(atol=1e-6, rtol=1e-5)
LR = 0.1

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def model():
    return random_dit(**CFG)


def global_batch():
    m = model()
    x, t, y = dit_inputs(m, GLOBAL_B, seed=4)
    return x, t, y, random_kept(GLOBAL_B, N, K, seed=5)


def loss_of(out):
    return out.square().mean()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shards are DTensors


def _clean(name: str) -> str:
    return name.replace("module.", "")


# ------------------------------------------------------------------------------------- ranks


def _train_one_step(rank: int, wrap: str) -> dict:
    """One forward/backward/SGD step on this rank's slice with its slice of the global kept indices."""
    tm = treadfx.transform(model(), **ROUTE).train()
    x, t, y, kept = global_batch()
    sl = slice(rank * GLOBAL_B // WORLD, (rank + 1) * GLOBAL_B // WORLD)
    if wrap == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(tm)
    else:
        from torch.distributed.fsdp import fully_shard

        if wrap == "fsdp2_blocks_prepared":
            treadfx.prepare(tm, x[sl], t[sl], y[sl])  # trace while the blocks' parameters are still whole
        if wrap != "fsdp2_root":
            for blk in tm.blocks:
                fully_shard(blk)
        wrapped = fully_shard(tm)  # swaps the class in place: FSDPDiT
    assert wrapped.module is tm if wrap == "ddp" else (wrapped is tm and treadfx.is_transformed(wrapped))
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR)
    with treadfx.fixed_routes(wrapped, [kept[sl]]):
        loss_of(wrapped(x[sl], t[sl], y[sl])).backward()
    grads = {_clean(n): _full(p.grad).clone() for n, p in wrapped.named_parameters() if p.grad is not None}
    opt.step()
    params = {_clean(n): _full(p.detach()).clone() for n, p in wrapped.named_parameters()}
    return {"grads": grads, "params": params, "kept": treadfx.last_routes(wrapped)[0].kept,
            "class": type(wrapped).__name__}


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def _seeded_draws(rank: int) -> dict:
    """Kept indices of two seeded forwards under DDP, gathered from every rank."""
    tm = treadfx.transform(model(), **ROUTE, seed=SEED).train()
    ddp = torch.nn.parallel.DistributedDataParallel(tm)
    x, t, y, _ = global_batch()
    sl = slice(rank * GLOBAL_B // WORLD, (rank + 1) * GLOBAL_B // WORLD)
    draws = []
    # with gradients: training mode routes only when gradients are enabled
    for _ in range(2):
        ddp(x[sl], t[sl], y[sl])
        draws.append(_gather(treadfx.last_routes(ddp)[0].kept))
    return {"draws": draws}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    results: dict = {}
    # traced before init_process_group (e.g. transform(..., example_inputs=...) at model build time)
    x, t, y, _ = global_batch()
    early_tm = treadfx.transform(model(), **ROUTE, seed=SEED, example_inputs=(x[:2], t[:2], y[:2]))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        early_tm.train()(x[:2], t[:2], y[:2])  # same signature as traced (grad mode is part of it): no retrace
        results["seeded_traced_before_init"] = {"draws": [_gather(treadfx.last_routes(early_tm)[0].kept)]}
        results["ddp"] = _train_one_step(rank, "ddp")
        results["seeded"] = _seeded_draws(rank)
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
        except ImportError as e:
            results["fsdp2_unavailable"] = f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard: {e}"
        else:
            for wrap in ("fsdp2_root", "fsdp2_blocks_prepared", "fsdp2_blocks"):
                try:
                    results[wrap] = _train_one_step(rank, wrap)
                except Exception as e:  # noqa: BLE001 - recorded for the test to report
                    results[wrap] = {"error": f"{type(e).__name__}: {e}"}
                dist.barrier()
    except Exception:
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the 2-rank job once and load each rank's results."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in res:
        assert "crash" not in r, r.get("crash")
    return res


@pytest.fixture(scope="module")
def reference():
    """Single process: the whole global batch with the concatenated kept indices, mean loss, one SGD step."""
    tm = treadfx.transform(model(), **ROUTE).train()
    x, t, y, kept = global_batch()
    opt = torch.optim.SGD(tm.parameters(), lr=LR)
    with treadfx.fixed_routes(tm, [kept]):
        loss_of(tm(x, t, y)).backward()
    grads = {n: p.grad.clone() for n, p in tm.named_parameters() if p.grad is not None}
    opt.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in tm.named_parameters()}, "kept": kept}


def _compare(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


def _check_wrap(ranks, reference, wrap: str) -> None:
    if "fsdp2_unavailable" in ranks[0] and wrap.startswith("fsdp2"):
        pytest.skip(ranks[0]["fsdp2_unavailable"])
    for rank, res in enumerate(ranks):
        r = res[wrap]
        assert "error" not in r, r.get("error")
        sl = slice(rank * GLOBAL_B // WORLD, (rank + 1) * GLOBAL_B // WORLD)
        assert torch.equal(r["kept"], reference["kept"][sl])
        _compare(r["grads"], reference["grads"])
        _compare(r["params"], reference["params"])


def test_ddp_gradients_and_step_equal_single_process(ranks, reference):
    """DDP: per-rank gradients and parameters after one SGD step equal the single-process global-batch reference."""
    _check_wrap(ranks, reference, "ddp")


def test_fsdp2_root_gradients_and_step_equal_single_process(ranks, reference):
    """FSDP2 (fully_shard on the transformed root, after transform): gradients and step equal the reference."""
    _check_wrap(ranks, reference, "fsdp2_root")
    assert ranks[0]["fsdp2_root"]["class"] == "FSDPDiT"


def test_fsdp2_per_block_after_prepare_equals_single_process(ranks, reference):
    """FSDP2 per block + root works when the model is traced (treadfx.prepare) before fully_shard."""
    _check_wrap(ranks, reference, "fsdp2_blocks_prepared")


def test_fsdp2_per_block_traced_after_sharding(ranks, reference):
    """FSDP2 per block + root, first traced after sharding (the usual recipe) equals the reference."""
    _check_wrap(ranks, reference, "fsdp2_blocks")


def test_seeded_selection_differs_per_rank_and_rank0_is_reproducible(ranks):
    """Seeded: the two ranks draw different routes each step; one process with the same seed reproduces rank 0."""
    draws = ranks[0]["seeded"]["draws"]
    assert all(torch.equal(a, b) for a, b in zip(draws[0], ranks[1]["seeded"]["draws"][0]))  # gathered identically
    for step in draws:
        assert step[0].shape == step[1].shape == (GLOBAL_B // WORLD, K)
        assert not torch.equal(step[0], step[1])
    assert not torch.equal(draws[0][0], draws[1][0])  # and each forward draws anew
    tm = treadfx.transform(model(), **ROUTE, seed=SEED).train()
    x, t, y, _ = global_batch()
    # with gradients: training mode routes only when gradients are enabled
    for step in draws:
        tm(x[:2], t[:2], y[:2])
        assert torch.equal(treadfx.last_routes(tm)[0].kept, step[0])


def test_seeded_selection_differs_per_rank_when_traced_before_init(ranks):
    """Seeded selection traced before init_process_group still gives each rank its own routes."""
    step = ranks[0]["seeded_traced_before_init"]["draws"][0]
    assert not torch.equal(step[0], step[1])


if __name__ == "__main__":  # the 2-rank job: python tests/test_distributed.py OUT_DIR
    import torch.multiprocessing as mp

    # fork where the platform has it: the ranks inherit the imported torch and treadfx instead of importing them
    # again (spawn), which was most of this job's time; the parent only imports (one thread: no pool to inherit)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(_free_port(), sys.argv[1]), nprocs=WORLD, join=True, start_method=method)
