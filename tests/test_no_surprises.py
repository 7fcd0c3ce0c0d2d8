"""transform adds nothing to the state, does not touch the model it is given, and shares its parameters."""

from __future__ import annotations

import copy
import io
import pickle

import torch
import torch.nn as nn

import treadfx
from treadfx.models.dit import DiT

from helpers import tiny_dit, tiny_dit_inputs


def small_dit(seed: int = 0) -> DiT:
    return tiny_dit(depth=5, seed=seed)


def inputs(batch: int = 3):
    return tiny_dit_inputs(batch, seed=7)


def snapshot(m: nn.Module) -> dict:
    """Everything about a module tree that transform could possibly change."""
    return {
        "class": type(m),
        "modules": [(name, type(mod), id(mod), mod.training, sorted(mod.__dict__),
                     len(mod._forward_hooks), len(mod._forward_pre_hooks)) for name, mod in m.named_modules()],
        "params": [(name, id(p), p.requires_grad) for name, p in m.named_parameters()],
        "buffers": [(name, id(b)) for name, b in m.named_buffers()],
        "state": {k: v.clone() for k, v in m.state_dict().items()},
    }


def same_snapshot(a: dict, b: dict) -> bool:
    return (a["class"] is b["class"] and a["modules"] == b["modules"] and a["params"] == b["params"]
            and a["buffers"] == b["buffers"] and a["state"].keys() == b["state"].keys()
            and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]))


def test_no_parameters_or_buffers_added_even_after_tracing():
    m = small_dit()
    tm = treadfx.transform(m, start=1, end=3)
    tm(*inputs())  # traced, routed, graph cached
    assert list(tm.state_dict()) == list(m.state_dict())
    assert [n for n, _ in tm.named_parameters()] == [n for n, _ in m.named_parameters()]
    assert [n for n, _ in tm.named_buffers()] == [n for n, _ in m.named_buffers()]
    assert all(a is b for a, b in zip(tm.parameters(), m.parameters()))


def test_given_module_is_not_mutated_by_transform_training_or_mode_changes():
    m = small_dit()
    m.train()
    before = snapshot(m)
    tm = treadfx.transform(m, routes=[(0, 1, 0.5), (2, 3, 0.25)])
    tm(*inputs()).mean().backward()
    tm.eval()
    tm(*inputs())
    with treadfx.force_routing(tm, 0.5):
        tm(*inputs())
    treadfx.set_ratio(tm, 0.3)
    for p in m.parameters():  # gradients are the only (shared, expected) side effect
        p.grad = None
    assert same_snapshot(before, snapshot(m))
    assert m.training and all(mod.training for mod in m.modules())


def test_inplace_transform_is_the_only_way_to_change_the_given_object():
    m = small_dit()
    tm = treadfx.transform(m, start=1, end=2, inplace=True)
    assert tm is m and treadfx.is_transformed(m) and treadfx.original_class(m) is DiT


def test_state_dict_loads_into_the_original_class_and_back():
    m = small_dit(seed=1)
    tm = treadfx.transform(m, start=1, end=3)
    tm(*inputs())
    fresh = small_dit(seed=2)
    fresh.load_state_dict(tm.state_dict(), strict=True)
    fresh.eval()
    tm.eval()
    assert torch.equal(fresh(*inputs()), tm(*inputs()))
    other = treadfx.transform(small_dit(seed=3), start=1, end=3)
    other.load_state_dict(small_dit(seed=1).state_dict(), strict=True)
    other.eval()
    assert torch.equal(other(*inputs()), fresh(*inputs()))


def test_optimizer_built_before_transform_trains_the_transformed_model():
    m = small_dit()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    tm = treadfx.transform(m, start=1, end=3)
    w = tm.blocks[2].mlp.fc1.weight.detach().clone()
    tm(*inputs()).square().mean().backward()
    opt.step()
    assert not torch.equal(tm.blocks[2].mlp.fc1.weight, w)
    assert tm.blocks[2].mlp.fc1.weight is m.blocks[2].mlp.fc1.weight


def test_optimizer_built_after_transform_sees_the_same_parameters():
    m = small_dit()
    tm = treadfx.transform(m, start=1, end=3)
    assert [id(p) for g in torch.optim.AdamW(tm.parameters()).param_groups for p in g["params"]] == \
        [id(p) for p in m.parameters()]


def test_isinstance_and_attributes_of_the_original_class():
    m = small_dit()
    tm = treadfx.transform(m, start=1, end=3)
    assert isinstance(tm, DiT) and type(tm).__name__ == "DiT" and type(tm) is not DiT
    assert tm.config == m.config and tm.unpatchify is not None
    assert repr(tm).splitlines()[1].strip() == "treadfx routes=[1..3@0.5]"


def test_deepcopy_is_independent_and_keeps_routing():
    tm = treadfx.transform(small_dit(), start=1, end=3)
    tm(*inputs())
    twin = copy.deepcopy(tm)
    assert treadfx.is_transformed(twin)
    assert all(a is not b and torch.equal(a, b) for a, b in zip(twin.parameters(), tm.parameters()))
    out = twin(*inputs())
    assert treadfx.last_routes(twin)[0].kept.shape == (3, 8)
    twin.eval(), tm.eval()
    assert torch.equal(twin(*inputs()), tm(*inputs()))
    assert out.shape == (3, 8, 8, 8)


def test_pickle_round_trip_rebuilds_a_transformed_model():
    tm = treadfx.transform(small_dit(), routes=[(1, 2, 0.25)])
    tm(*inputs())
    buf = io.BytesIO()
    torch.save(tm, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert treadfx.is_transformed(back) and type(back).__name__ == "DiT" and type(back) is not DiT
    assert back._treadfx.config.routes == tm._treadfx.config.routes
    back.eval(), tm.eval()
    assert torch.equal(back(*inputs()), tm(*inputs()))
    assert pickle.loads(pickle.dumps(tm._treadfx.config)) == tm._treadfx.config


def test_moving_the_model_drops_traced_graphs_and_retraces():
    from treadfx.transformed import state_of

    m = small_dit()
    tm = treadfx.transform(m, start=1, end=3)
    tm(*inputs())
    first = state_of(tm).current
    assert len(state_of(tm).programs) == 1
    tm.to("cpu")  # any .to()/.half()/.cuda() may change dtypes or devices the graph specialised on
    assert state_of(tm).programs == {} and state_of(tm).current is None
    tm(*inputs())
    assert state_of(tm).current is not first
    tm.eval(), m.eval()
    assert torch.equal(tm(*inputs()), m(*inputs()))


def test_tracing_inside_autocast_leaves_the_autocast_cast_cache_clean():
    """The first routed call traces on fake tensors inside the user's autocast region; later real forwards in the
    same region (which reuse autocast's cached bf16 weights) must compute exactly what a fresh region computes."""
    from helpers import dit_inputs, random_dit

    m = random_dit(depth=5, width_per_head=8, heads=2, patch=2, grid=4)
    x, t, y = dit_inputs(m, 3)
    m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = m(x, t, y)
    tm = treadfx.transform(m, start=1, end=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = tm(x, t, y)  # trace + analysis + routed forward, same region
        assert routed.dtype == torch.bfloat16
        with torch.no_grad():
            assert torch.equal(m(x, t, y), fresh)
            tm.eval()
            assert torch.equal(tm(x, t, y), fresh)
