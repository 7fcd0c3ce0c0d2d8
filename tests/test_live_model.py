"""The routed model is the live model: checkpointing, replaced modules, hooks, outputs, threads, RNG.

Every test compares against the original model (eval, or train at ratio 0, where no token is skipped) or against
the hand-written TREAD forward in ``tests/helpers.py`` on the same kept indices.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt

import treadfx
from treadfx.models.dit import DiT
from treadfx.transformed import state_of

from helpers import dit_inputs, random_dit, random_kept, reference_tread


class CheckpointedDiT(DiT):
    """The reference DiT with per-block gradient checkpointing, as training scripts write it."""

    grad_ckpt: bool = True
    use_reentrant: bool = False

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            if self.grad_ckpt and torch.is_grad_enabled():
                x = ckpt.checkpoint(block, x, c, use_reentrant=self.use_reentrant)
            else:
                x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def _small(cls=DiT, depth=6, seed=0):
    base = random_dit(depth=depth, width_per_head=8, heads=2, patch=2, grid=4, seed=seed)
    if cls is DiT:
        return base
    m = object.__new__(cls)
    m.__dict__.update(base.__dict__)
    return m


def _saved_bytes(fn) -> int:
    """Bytes of the storages autograd saves for backward while ``fn`` runs (what checkpointing reduces)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


class ThreeBlocks(nn.Module):
    """Three one-Linear blocks in a ModuleList; each test writes the forward it needs."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_blocks_stay_checkpointed_and_match_the_reference(reentrant):
    m = _small(CheckpointedDiT)
    m.use_reentrant = reentrant
    x, t, y = dit_inputs(m, 2)
    routes = [(1, 4, 0.5)]
    kept = [random_kept(2, 16, 8, seed=3)]
    tm = treadfx.transform(m, routes=routes)
    tm.train()
    with treadfx.fixed_routes(tm, kept):
        tm(x, t, y)  # the first call traces
        routed_bytes, out = _saved_bytes(lambda: tm(x, t, y))
    out.square().mean().backward()
    g_routed = _grads(tm)
    tm.zero_grad()

    dense_bytes, _ = _saved_bytes(lambda: m(x, t, y))  # the checkpointed original, dense
    m.grad_ckpt = False
    plain_bytes, _ = _saved_bytes(lambda: reference_tread(m, x, t, y, routes, kept))
    assert routed_bytes <= dense_bytes < plain_bytes / 2

    ref = reference_tread(m, x, t, y, routes, kept)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    ref.square().mean().backward()
    g_ref = _grads(m)
    assert g_routed.keys() == g_ref.keys()
    for k in g_ref:
        assert torch.allclose(g_routed[k], g_ref[k], atol=1e-6, rtol=1e-4), k


def test_checkpointing_switched_on_after_the_first_step_takes_effect():
    m = _small(CheckpointedDiT)
    m.grad_ckpt = False
    x, t, y = dit_inputs(m, 2)
    tm = treadfx.transform(m, start=1, end=4)
    kept = [random_kept(2, 16, 8, seed=4)]
    with treadfx.fixed_routes(tm, kept):
        tm(x, t, y)
        before, _ = _saved_bytes(lambda: tm(x, t, y))
        tm.grad_ckpt = True
        tm(x, t, y)  # retraces: the flag the forward reads changed
        after, out = _saved_bytes(lambda: tm(x, t, y))
    assert after < before / 2
    m.grad_ckpt = False
    assert torch.allclose(out, reference_tread(m, x, t, y, [(1, 4, 0.5)], kept), atol=1e-6)


def _diffusers_case(name):
    from backbone_refs import CASES

    return CASES[name]


@pytest.mark.parametrize("name", ["diffusers_dit", "diffusers_sd3", "diffusers_flux"])
def test_diffusers_gradient_checkpointing_is_kept(name):
    case = _diffusers_case(name)
    m = case.build()
    args, kwargs = case.inputs()
    m.enable_gradient_checkpointing()
    m.train()
    tm = treadfx.transform(m, routes=case.routes)
    from backbone_refs import random_kept as kept_indices

    # Flux's RoPE table has no batch dimension: one subset for the whole batch
    kept = [kept_indices(None if name == "diffusers_flux" else 2, 16, 8, seed=5)]
    with treadfx.fixed_routes(tm, kept):
        tm(*args, **kwargs)
        routed_bytes, out = _saved_bytes(lambda: tm(*args, **kwargs))
    m.disable_gradient_checkpointing()
    dense_plain, _ = _saved_bytes(lambda: m(*args, **kwargs))
    m.enable_gradient_checkpointing()
    dense_ckpt, _ = _saved_bytes(lambda: m(*args, **kwargs))
    assert dense_ckpt < dense_plain
    assert routed_bytes <= dense_ckpt
    m.disable_gradient_checkpointing()  # the hook reference finds RoPE by keyword, which checkpointing hides
    ref = case.reference(m, case.spans, kept, *args, **kwargs)
    assert torch.allclose(out.sample if hasattr(out, "sample") else out[0], ref, atol=1e-5)
    info = state_of(tm).current.live
    assert len(info.checkpointed) == len(m.transformer_blocks) + len(getattr(m, "single_transformer_blocks", []))


# ------------------------------------------------------------------------------- live modules


def _ratio0(tm):
    """Train at ratio 0 (no token skipped) must be the eval forward bit for bit."""
    treadfx.set_ratio(tm, 0.0)
    return tm


def test_replaced_module_reassigned_parameter_and_attributes_take_effect_at_the_next_step():
    m = random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4)
    x, t, y = dit_inputs(m, 2)
    tm = _ratio0(treadfx.transform(m, start=1, end=2))
    tm(x, t, y)  # first step traces

    def check():
        tm.train()
        a = tm(x, t, y)
        tm.eval()
        b = tm(x, t, y)
        tm.train()
        assert torch.equal(a, b)
        return a

    first = check()
    tm.final_layer.linear = nn.Linear(16, 32)  # a module outside the blocks
    second = check()
    assert not torch.equal(first, second)
    tm.t_embedder.mlp[0].weight = nn.Parameter(torch.randn_like(tm.t_embedder.mlp[0].weight))
    third = check()
    assert not torch.equal(second, third)
    sd = {k: v.clone() + 0.01 for k, v in tm.state_dict().items()}
    tm.load_state_dict(sd, assign=True)
    fourth = check()
    assert not torch.equal(third, fourth)
    tm.pos_embed = nn.Parameter(torch.randn_like(tm.pos_embed), requires_grad=False)  # read by the root forward
    fifth = check()
    assert not torch.equal(fourth, fifth)
    out = tm(x, t, y)
    out.sum().backward()
    assert tm.final_layer.linear.weight.grad is not None and tm.t_embedder.mlp[0].weight.grad is not None


def test_root_attribute_change_retraces():
    class Net(ThreeBlocks):
        def __init__(self):
            super().__init__()
            self.scale = 1.0  # an instance attribute the root forward reads

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x * self.scale

    tm = _ratio0(treadfx.transform(Net(), start=0, end=1))
    x = torch.randn(2, 6, 4)
    a = tm(x)
    tm.scale = 3.0
    assert torch.allclose(tm(x), 3 * a)


def _sd3_with_lora():
    from peft import LoraConfig

    case = _diffusers_case("diffusers_sd3")
    m = case.build()
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                        target_modules=["proj_out", "to_q", "to_k", "linear_1", "proj"])
    return case, m, config


def test_peft_lora_inside_and_outside_the_blocks_before_and_after_the_first_step():
    from peft import inject_adapter_in_model

    case, m, config = _sd3_with_lora()
    args, kwargs = case.inputs()
    tm = _ratio0(treadfx.transform(m, routes=case.routes))
    tm.train()
    base = tm(*args, **kwargs).sample
    tm.eval()
    assert torch.equal(base, tm(*args, **kwargs).sample)
    inject_adapter_in_model(config, tm, adapter_name="a")  # after the first step
    tm.train()
    with_lora = tm(*args, **kwargs).sample
    tm.eval()
    assert torch.equal(with_lora, tm(*args, **kwargs).sample)
    assert not torch.equal(with_lora, base)
    tm.train()
    with_lora.square().mean()  # graph check below uses a fresh forward
    out = tm(*args, **kwargs).sample
    out.square().mean().backward()
    lora = {n: p for n, p in tm.named_parameters() if "lora_" in n}
    outside = [n for n in lora if n.startswith(("proj_out", "time_text_embed", "pos_embed"))]
    assert outside and all(lora[n].grad is not None and lora[n].grad.abs().sum() > 0 for n in lora)


def test_peft_adapter_toggles_take_effect_at_the_next_step():
    from peft import LoraConfig

    case = _diffusers_case("diffusers_sd3")
    m = case.build()
    args, kwargs = case.inputs()
    m.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                             target_modules=["proj_out", "to_q", "to_v"]), adapter_name="one")
    m.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["proj_out", "to_q", "to_v"]), adapter_name="two")
    tm = _ratio0(treadfx.transform(m, routes=case.routes))

    def train_equals_eval():
        tm.train()
        a = tm(*args, **kwargs).sample
        tm.eval()
        b = tm(*args, **kwargs).sample
        tm.train()
        assert torch.equal(a, b)
        return a

    outs = [train_equals_eval()]
    tm.set_adapters(["one", "two"], weights=[0.5, 1.0])
    outs.append(train_equals_eval())
    tm.disable_adapters()
    outs.append(train_equals_eval())
    tm.enable_adapters()
    outs.append(train_equals_eval())
    for a, b in zip(outs, outs[1:]):
        assert not torch.equal(a, b)


def test_lora_gradients_equal_the_hand_written_reference():
    from peft import inject_adapter_in_model

    case, m, config = _sd3_with_lora()
    inject_adapter_in_model(config, m, adapter_name="a")
    args, kwargs = case.inputs()
    tm = treadfx.transform(m, routes=case.routes)
    kept = [random_kept(2, 16, 8, seed=9)]
    with treadfx.fixed_routes(tm, kept):
        tm(*args, **kwargs).sample.square().mean().backward()
    got = {n: p.grad.clone() for n, p in tm.named_parameters() if "lora_" in n}
    tm.zero_grad()
    case.reference(m, case.spans, kept, *args, **kwargs).square().mean().backward()
    for n, p in m.named_parameters():
        if "lora_" in n:
            assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-4), n


# ---------------------------------------------------------------------------------------- hooks


def test_hooks_fire_once_per_forward_with_real_tensors_and_never_during_analysis():
    m = random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4)
    x, t, y = dit_inputs(m, 2)
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    seen: dict[str, list] = {}

    def recorder(name):
        def hook(mod, args, out):
            assert type(out) is torch.Tensor and type(args[0]) is torch.Tensor  # never a proxy or fake
            seen.setdefault(name, []).append(tuple(out.shape))
        return hook

    for name in ("x_embedder", "blocks.1", "blocks.2.attn", "final_layer", "t_embedder.mlp"):
        tm.get_submodule(name).register_forward_hook(recorder(name))
    tm(x, t, y)
    assert seen == {"x_embedder": [(2, 16, 16)], "blocks.1": [(2, 8, 16)], "blocks.2.attn": [(2, 8, 16)],
                    "final_layer": [(2, 16, 32)], "t_embedder.mlp": [(2, 16)]}
    tm.get_submodule("blocks.3").register_forward_hook(recorder("blocks.3"))  # added after the first step
    tm.get_submodule("y_embedder").register_forward_hook(recorder("y_embedder"))
    seen.clear()
    tm(x, t, y)
    assert seen["blocks.3"] == [(2, 16, 16)] and seen["y_embedder"] == [(2, 16)]
    assert all(len(v) == 1 for v in seen.values())


def test_removed_pre_hook_stops_acting():
    m = random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4)
    x, t, y = dit_inputs(m, 2)
    tm = _ratio0(treadfx.transform(m, start=1, end=2))
    h = tm.t_embedder.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
    zeroed = tm(x, t, y)
    h.remove()
    tm.eval()
    assert torch.equal(tm.train()(x, t, y), tm.eval()(x, t, y))
    assert not torch.equal(zeroed, tm(x, t, y))


# --------------------------------------------------------------------------------------- outputs


@dataclasses.dataclass
class PlainOut:
    sample: torch.Tensor
    extra: torch.Tensor
    note: str = "x"


class ObjOut:
    def __init__(self, sample, extra):
        self.sample, self.extra, self.tag = sample, extra, 3


class TupleOut(NamedTuple):
    sample: torch.Tensor
    extra: torch.Tensor


def _model_output_cls():
    from diffusers.utils import BaseOutput

    @dataclasses.dataclass
    class MOut(BaseOutput):
        sample: torch.Tensor = None
        extra: torch.Tensor = None

    return MOut


@pytest.mark.parametrize("kind", ["dataclass", "object", "namedtuple", "model_output", "dict", "nested"])
def test_structured_outputs_carry_real_tensors_and_train(kind):
    wrap = {
        "dataclass": lambda a, b: PlainOut(a, b),
        "object": lambda a, b: ObjOut(a, b),
        "namedtuple": lambda a, b: TupleOut(a, b),
        "model_output": lambda a, b: _model_output_cls()(sample=a, extra=b),
        "dict": lambda a, b: {"sample": a, "extra": [b, 1]},
        "nested": lambda a, b: (a, (b, (a,))),
    }[kind]

    class Net(ThreeBlocks):
        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return wrap(x, x.mean(1))

    torch.manual_seed(0)
    net = Net()
    tm = treadfx.transform(net, start=0, end=1)
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)
    x = torch.randn(2, 6, 4)
    outs = []
    for _ in range(2):
        out = tm(x)
        outs.append(out)
        leaves = [l for l in torch.utils._pytree.tree_leaves(_as_tree(out)) if isinstance(l, torch.Tensor)]
        assert leaves and all(type(l) is torch.Tensor and l.grad_fn is not None for l in leaves)
        before = [p.clone() for p in tm.parameters()]
        opt.zero_grad()
        sum(l.sum() for l in leaves).backward()
        opt.step()
        assert all(not torch.equal(a, p) for a, p in zip(before, tm.parameters()))
    assert outs[0] is not outs[1] and type(outs[0]) is type(outs[1])


def _as_tree(out):
    if dataclasses.is_dataclass(out):
        return [getattr(out, f.name) for f in dataclasses.fields(out)]
    if isinstance(out, ObjOut):
        return [out.sample, out.extra]
    return out


# --------------------------------------------------------------------------------------- threads


def test_tracing_in_one_thread_never_breaks_module_calls_in_another():
    m = random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4)
    x, t, y = dit_inputs(m, 2)
    other = random_dit(depth=3, width_per_head=8, heads=2, patch=2, grid=4, seed=5).eval()
    ox, ot, oy = dit_inputs(other, 2)
    with torch.no_grad():
        expected = other(ox, ot, oy)
    stop = threading.Event()
    errors: list = []
    results: list = []

    def background():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    results.append(torch.equal(other(ox, ot, oy), expected))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=background)
    th.start()
    try:
        for k in range(3):
            tm = treadfx.transform(m, start=1, end=2)
            tm(x, t, y)
    finally:
        stop.set()
        th.join()
    assert not errors and results and all(results)


def test_concurrent_first_calls_and_per_thread_last_routes():
    models = [treadfx.transform(random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4, seed=s),
                                start=1, end=2) for s in range(2)]
    errors, kept = [], {}
    barrier = threading.Barrier(2)

    def run(i):
        try:
            x, t, y = dit_inputs(models[i], 2, seed=i)
            barrier.wait()
            models[i](x, t, y)
            kept[i] = treadfx.last_routes(models[i])[0].kept.clone()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ths = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors and set(kept) == {0, 1}
    shared = models[0]
    x, t, y = dit_inputs(shared, 2)
    seen = {}

    def call(name):
        shared(x, t, y)
        seen[name] = treadfx.last_routes(shared)[0].kept.clone()

    call("main")
    th = threading.Thread(target=call, args=("other",))
    th.start()
    th.join()
    assert torch.equal(treadfx.last_routes(shared)[0].kept, seen["main"])


# ------------------------------------------------------------------------------ compiled submodules


@pytest.mark.parametrize("where", ["blocks", "embedders"])
def test_compiled_submodules_train_routed_like_uncompiled(where, fresh_dynamo):
    m = random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4)
    x, t, y = dit_inputs(m, 2)
    kept = [random_kept(2, 16, 8, seed=2)]
    ref = reference_tread(m, x, t, y, [(1, 2, 0.5)], kept)
    if where == "blocks":
        for i in range(len(m.blocks)):
            m.blocks[i] = torch.compile(m.blocks[i], backend="eager")
    else:
        m.x_embedder = torch.compile(m.x_embedder, backend="eager")
        m.t_embedder.compile(backend="eager")
    tm = treadfx.transform(m, start=1, end=2)
    with treadfx.fixed_routes(tm, kept):
        out = tm(x, t, y)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in tm.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------- Python scalars


def test_a_float_argument_that_changes_every_step_does_not_retrace():
    class Net(ThreeBlocks):
        def forward(self, x, guidance: float):
            for b in self.blocks:
                x = b(x) * guidance
            return x

    tm = _ratio0(treadfx.transform(Net(), start=0, end=1))
    x = torch.randn(2, 6, 4)
    for g in torch.linspace(0.5, 2.0, 10).tolist():
        out = tm(x, g)
        tm.eval()
        assert torch.equal(out, tm(x, g))
        tm.train()
    assert sum(len(v) for v in state_of(tm).programs.values()) == 1


def test_a_float_the_forward_branches_on_is_guarded_and_bounded_with_a_warning():
    class Net(ThreeBlocks):
        def forward(self, x, cfg_scale: float):
            for b in self.blocks:
                x = b(x)
            return x * 2 if cfg_scale > 1.0 else x

    tm = _ratio0(treadfx.transform(Net(), start=0, end=1))
    x = torch.randn(2, 6, 4)
    a = tm(x, 0.5)
    b = tm(x, 1.5)
    assert torch.equal(b, 2 * a)  # not the graph of the first value
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for g in range(10):
            tm(x, 2.0 + g)
    assert any("cfg_scale" in str(i.message) for i in w)
    assert sum(len(v) for v in state_of(tm).programs.values()) <= treadfx.transformed.MAX_VALUE_VARIANTS


def test_an_int_argument_that_changes_every_step_is_bounded_with_a_warning_naming_it():
    class Net(ThreeBlocks):
        def forward(self, x, step: int):
            for b in self.blocks:
                x = b(x)
            return x + step

    tm = treadfx.transform(Net(), start=0, end=1)
    x = torch.randn(2, 6, 4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for s in range(treadfx.transformed.MAX_PROGRAMS + 3):
            tm(x, s)
    assert any("`step`" in str(i.message) for i in w)
    assert len(state_of(tm).programs) == treadfx.transformed.MAX_PROGRAMS


# ---------------------------------------------------------------------------------- early errors


@pytest.mark.parametrize("routes, words", [
    ([(1, 3, 0.5), (2, 4, 0.5)], "overlaps"),
    ([(4, 5, 0.5), (1, 2, 0.5)], "comes before"),
    ([(-2, 1, 0.5)], "start must be <= end"),
])
@pytest.mark.parametrize("inplace", [False, True])
def test_route_errors_are_raised_by_transform_before_the_model_is_touched(routes, words, inplace):
    m = random_dit(depth=6, width_per_head=8, heads=2, patch=2, grid=4)
    cls, keys = type(m), list(m.state_dict())
    with pytest.raises(treadfx.InvalidRouteError, match=words):
        treadfx.transform(m, routes=routes, inplace=inplace)
    assert type(m) is cls and not treadfx.is_transformed(m) and list(m.state_dict()) == keys


def test_a_transformed_model_inside_the_module_is_refused():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a):
            return self.inner(*a)

    tm = treadfx.transform(random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4), start=1, end=2)
    with pytest.raises(treadfx.LiveModelError, match="already a treadfx-transformed model.*transform only one"):
        treadfx.transform(Wrapper(tm), start=1, end=2, inplace=True)


# ------------------------------------------------------------------------------------------- RNG


def test_first_training_call_draws_exactly_what_the_hand_written_router_draws():
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=4, num_heads=2, mlp_ratio=2.0,
            class_dropout_prob=0.3, num_classes=7, zero_init=False)  # label dropout draws from the global RNG too
    x, t, y = dit_inputs(m, 2)
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    torch.manual_seed(123)
    out = tm(x, t, y)
    state_after = torch.get_rng_state()
    kept = treadfx.last_routes(tm)[0].kept
    # the official router: label dropout in the embedder, then argsort(rand(B, N)) at route-out
    torch.manual_seed(123)
    h = m.x_embedder(x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y, True)
    h = m.blocks[0](h, c)
    draw = torch.rand(2, 16).argsort(dim=1)[:, :8]
    assert torch.equal(torch.get_rng_state(), state_after)
    assert torch.equal(draw, kept)
    torch.manual_seed(123)
    assert torch.equal(out, reference_tread(m, x, t, y, [(1, 2, 0.5)], [draw]))
