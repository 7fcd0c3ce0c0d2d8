"""Checkpoints, resume, EMA, pickling and deep copies of a transformed model (issue 6.3)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import treadfx
from treadfx.models.dit import DiT

from helpers import dit_inputs, random_dit, random_kept, reference_tread

CFG = dict(depth=5, width_per_head=8, heads=2, patch=2, grid=4)  # 16 tokens, 5 blocks
ROUTE = dict(start=1, end=3, ratio=0.5)
B, N, K = 3, 16, 8


def fresh_dit(seed: int = 0) -> DiT:
    return random_dit(**CFG, seed=seed)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def batch(step: int, model: DiT):
    """Data of one step from its own generator, so the global RNG only drives route selection."""
    g = torch.Generator().manual_seed(1000 + step)
    size = model.x_embedder.img_size
    x = torch.randn(B, model.in_channels, size, size, generator=g)
    noise = torch.randn(x.shape, generator=g)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, model.y_embedder.num_classes, (B,), generator=g)
    return x, noise, t, y


def train_step(model, opt, step: int, fixed: bool = False) -> float:
    """One rectified-flow step; ``fixed`` uses per-step kept indices instead of drawing them."""
    x, noise, t, y = batch(step, model)
    xt = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
    if fixed:
        with treadfx.fixed_routes(model, [random_kept(B, N, K, seed=step)]):
            pred = model(xt, t * 1000, y)
    else:
        pred = model(xt, t * 1000, y)
    loss = ((pred[:, : x.shape[1]] - (noise - x)) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def make(seed_routes=None, init_seed: int = 0):
    tm = treadfx.transform(fresh_dit(init_seed), **ROUTE, seed=seed_routes).train()
    return tm, torch.optim.AdamW(tm.parameters(), lr=1e-3, weight_decay=0.01)


def eval_out(model, seed: int = 9):
    x, t, y = dit_inputs(model, 2, seed=seed)
    with torch.no_grad():
        return model.eval()(x, t, y)


# ----------------------------------------------------------------------------------- state_dict both ways


def test_transformed_checkpoint_loads_into_original_class_strict():
    """A trained transformed model's state_dict loads strictly into a plain DiT and gives identical eval outputs."""
    tm, opt = make()
    for s in range(2):
        train_step(tm, opt, s)
    sd = roundtrip(tm.state_dict())
    assert list(sd) == list(fresh_dit().state_dict())
    plain = fresh_dit(init_seed := 5)
    assert not torch.equal(eval_out(plain), eval_out(tm)), init_seed
    assert plain.load_state_dict(sd, strict=True).missing_keys == []
    assert type(plain) is DiT
    assert torch.equal(eval_out(plain), eval_out(tm))


def test_original_checkpoint_loads_into_transformed_model_strict():
    """A plain DiT checkpoint loads strictly into a transformed model: eval identical, training equals the reference."""
    src = fresh_dit(3)
    sd = roundtrip(src.state_dict())
    tm = treadfx.transform(fresh_dit(4), **ROUTE)
    result = tm.load_state_dict(sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(eval_out(tm), eval_out(src))
    x, t, y = dit_inputs(src, B)
    kept = random_kept(B, N, K, seed=11)
    with treadfx.fixed_routes(tm.train(), [kept]):
        got = tm(x, t, y)
    assert torch.equal(got, reference_tread(src.train(), x, t, y, [(1, 3, 0.5)], [kept]))


def test_strict_load_rejects_a_different_architecture_the_same_way():
    """A mismatched checkpoint fails on the transformed model with the same error as on the original class."""
    sd = random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4).state_dict()
    errors = []
    for target in (fresh_dit(), treadfx.transform(fresh_dit(), **ROUTE)):
        with pytest.raises(RuntimeError) as e:
            target.load_state_dict(sd, strict=True)
        errors.append(str(e.value).replace("TreadDiT", "DiT"))
    assert errors[0] == errors[1]
    assert 'Missing key(s) in state_dict: "blocks.4.' in errors[0]


# ----------------------------------------------------------------------------------- resume


TOTAL, SPLIT = 4, 2


def _uninterrupted(fixed: bool, seed_routes=None, rng_seed: int = 123):
    torch.manual_seed(rng_seed)
    tm, opt = make(seed_routes)
    losses = [train_step(tm, opt, s, fixed) for s in range(TOTAL)]
    return tm, losses


def _resumed(fixed: bool, seed_routes=None, rng_seed: int = 123, restore_counter: bool = True):
    torch.manual_seed(rng_seed)
    tm, opt = make(seed_routes)
    losses = [train_step(tm, opt, s, fixed) for s in range(SPLIT)]
    ckpt = roundtrip({"model": tm.state_dict(), "opt": opt.state_dict(), "step": SPLIT,
                      "routing_step": treadfx.routing_step(tm), "rng": torch.get_rng_state()})
    del tm, opt
    torch.manual_seed(999)  # the resumed process starts from an unrelated RNG state
    tm, opt = make(seed_routes, init_seed=7)
    tm.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    if seed_routes is not None and restore_counter:
        # seeded selection draws from (seed, forward count); the count is not in state_dict (no buffers are
        # added), so it is saved beside it
        treadfx.set_routing_step(tm, ckpt["routing_step"])
    losses += [train_step(tm, opt, s, fixed) for s in range(ckpt["step"], TOTAL)]
    return tm, losses


def _assert_same_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n


@pytest.mark.parametrize("mode", ["fixed_routes", "global_rng", "seeded"])
def test_resume_is_bitwise_identical_to_uninterrupted_run(mode):
    """Train 2 steps, checkpoint model+optimizer(+RNG), resume in a fresh model: same losses and params as 4 steps."""
    fixed, seed = mode == "fixed_routes", (5 if mode == "seeded" else None)
    ref, ref_losses = _uninterrupted(fixed, seed)
    got, losses = _resumed(fixed, seed)
    assert losses == ref_losses
    _assert_same_params(got, ref)


def test_seeded_resume_without_counter_replays_first_routes():
    """Why routing_step is saved: a fresh seeded model starts its forward count at 0 and redraws step 0's routes;
    set_routing_step continues the sequence."""
    torch.manual_seed(0)
    tm, _ = make(seed_routes=5)
    x, t, y = dit_inputs(tm, B)
    draws = []
    for _ in range(2):
        tm(x, t, y)
        draws.append(treadfx.last_routes(tm)[0].kept)
    assert not torch.equal(draws[0], draws[1])
    resumed, _ = make(seed_routes=5)
    resumed.load_state_dict(tm.state_dict())
    resumed.train()(x, t, y)
    assert torch.equal(treadfx.last_routes(resumed)[0].kept, draws[0])
    assert treadfx.routing_step(tm) == 2
    again, _ = make(seed_routes=5)
    treadfx.set_routing_step(again, treadfx.routing_step(tm) - 1)
    again.train()(x, t, y)
    assert torch.equal(treadfx.last_routes(again)[0].kept, draws[1])
    with pytest.raises(treadfx.TransformError, match=r"set_routing_step\(step=-1\): step must be an int >= 0"):
        treadfx.set_routing_step(again, -1)


# ----------------------------------------------------------------------------------- EMA


def test_named_parameters_are_the_originals_objects_in_the_same_order():
    """transformed.named_parameters() yields the original's parameter objects, same names, same order."""
    m = fresh_dit()
    tm = treadfx.transform(m, **ROUTE)
    got, want = list(tm.named_parameters()), list(m.named_parameters())
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(got, want))
    assert [n for n, _ in tm.named_buffers()] == [n for n, _ in m.named_buffers()]


@torch.no_grad()
def _ema_update(ema: list[torch.Tensor], params, decay: float = 0.9) -> None:
    for e, p in zip(ema, params):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def test_ema_over_transformed_equals_ema_over_original_and_loads_into_dit():
    """EMA over transformed.parameters() == EMA over the original's; an EMA DiT copy loads from it strictly."""
    m = fresh_dit()
    tm = treadfx.transform(m, **ROUTE).train()
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-2)
    ema_t = [p.detach().clone() for p in tm.parameters()]
    ema_o = [p.detach().clone() for p in m.parameters()]
    ema_model = copy.deepcopy(m).requires_grad_(False)  # the usual EMA module, made from the *original*
    start = [p.clone() for p in ema_t]
    for s in range(3):
        train_step(tm, opt, s)
        _ema_update(ema_t, tm.parameters())
        _ema_update(ema_o, m.parameters())
        _ema_update(list(ema_model.parameters()), tm.parameters())
    assert all(torch.equal(a, b) for a, b in zip(ema_t, ema_o))
    assert all(torch.equal(a, b) for a, b in zip(ema_t, ema_model.parameters()))
    moved = [not torch.equal(a, b) for a, b, p in zip(ema_t, start, m.parameters()) if p.requires_grad]
    assert all(moved)  # every trainable parameter got a step (AdamW moves even zero-gradient ones via decay)
    plain = fresh_dit(8)
    plain.load_state_dict(roundtrip(ema_model.state_dict()), strict=True)
    assert torch.equal(eval_out(plain), eval_out(ema_model))


# ----------------------------------------------------------------------------------- pickle / deepcopy


def _copies(tm):
    yield "deepcopy", copy.deepcopy(tm)
    yield "pickle", pickle.loads(pickle.dumps(tm))
    buf = io.BytesIO()
    torch.save(tm, buf)
    buf.seek(0)
    yield "torch.save", torch.load(buf, weights_only=False)


def test_copies_work_and_are_independent():
    """deepcopy / pickle / torch.save of a trained transformed model: routed, equal outputs, independent state."""
    m = fresh_dit()
    tm = treadfx.transform(m, **ROUTE).train()
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)
    train_step(tm, opt, 0)  # traced, with optimizer state
    x, t, y = dit_inputs(m, B)
    kept = random_kept(B, N, K, seed=21)
    with treadfx.fixed_routes(tm, [kept]):  # routes only with gradients enabled
        ref_train = tm.train()(x, t, y).detach()
    ref_eval = eval_out(tm)
    for how, c in _copies(tm):
        assert type(c) is type(tm) and treadfx.is_transformed(c), how
        assert treadfx.original_class(c) is DiT, how
        assert list(c.state_dict()) == list(m.state_dict()), how
        assert all(a is not b and torch.equal(a, b) for a, b in zip(c.parameters(), tm.parameters())), how
        assert torch.equal(eval_out(c), ref_eval), how
        with treadfx.fixed_routes(c, [kept]):
            assert torch.equal(c.train()(x, t, y), ref_train), how
        c.train()(x, t, y)  # the copy draws its own routes
        assert treadfx.last_routes(c)[0].kept.shape == (B, K), how
        with torch.no_grad():
            for p in c.parameters():
                p.add_(1.0)
        treadfx.set_ratio(c, 0.25)
        assert torch.equal(eval_out(tm), ref_eval), how  # the original is untouched
        with treadfx.fixed_routes(tm, [kept]):
            assert torch.equal(tm.train()(x, t, y), ref_train), how
        c.train()(x, t, y)
        assert treadfx.last_routes(c)[0].kept.shape == (B, N - int(N * 0.25)), how
        assert treadfx.last_routes(tm)[0].kept.shape == (B, K), how
