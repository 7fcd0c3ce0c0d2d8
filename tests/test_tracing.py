"""The specialising tracer: what plain symbolic_trace cannot do, and what it must never do."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

import treadfx
from treadfx.blocks import block_graph_hash, find_block_candidates
from treadfx.models.dit import DiT
from treadfx.tracing import signature_of, trace
from treadfx.transformed import state_of

from helpers import tiny_dit, tiny_dit_inputs


def small_dit(dropout: float = 0.0) -> DiT:
    return tiny_dit(depth=4, dropout=dropout)


def inputs(batch: int = 3):
    return tiny_dit_inputs(batch, seed=5)


def test_plain_symbolic_trace_fails_on_dit_but_treadfx_traces_it():
    m = small_dit()
    with pytest.raises(Exception):
        fx.symbolic_trace(m)  # int(x.shape[1] ** 0.5) in unpatchify, assert in patch embedding
    prog = trace(m, DiT.forward, inputs(), {}, leaves=list(m.blocks))
    blocks = [n for n in prog.gm.graph.nodes if n.op == "call_module" and ".blocks." in f".{n.target}"]
    assert [n.target for n in blocks] == [f"m.blocks.{i}" for i in range(4)]
    m.eval()
    assert torch.equal(prog(*inputs()), m(*inputs()))


def test_shapes_are_specialised_per_signature():
    tm = treadfx.transform(small_dit(), start=1, end=2)
    tm(*inputs(3))
    tm(*inputs(5))
    tm(*inputs(3))
    assert len(state_of(tm).programs) == 2
    code = state_of(tm).current.gm.code
    assert "reshape(shape = (3, 4, 4, 2, 2, 8))" in code  # int(N ** 0.5) became a constant


def test_random_ops_are_recorded_not_frozen():
    m = small_dit(dropout=0.5)  # label dropout draws torch.rand(B) in the forward
    tm = treadfx.transform(m, start=1, end=2, ratio=0.0)  # ratio 0: routes draw no random numbers
    x, t, y = inputs(8)
    outs = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        outs.append(tm(x, t, y))
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])
    torch.manual_seed(1)
    assert torch.equal(m(x, t, y), outs[0])  # same RNG stream as the original forward
    assert "torch.rand(8" in state_of(tm).current.gm.code


def test_bool_arguments_are_part_of_the_signature_and_floats_are_graph_inputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(3)])

        def forward(self, x, scale: float = 1.0, flip: bool = False):
            for b in self.blocks:
                x = b(x)
            x = x * scale
            return x.flip(1) if flip else x

    tm = treadfx.transform(Net(), start=0, end=1)
    x = torch.randn(2, 6, 4)
    tm(x)
    with treadfx.fixed_routes(tm, [torch.tensor([[0, 1, 2], [3, 4, 5]])]):
        a, b = tm(x, 2.0), tm(x, 1.0)  # one graph: the float is an input, not a constant
    assert torch.equal(a, 2.0 * b)
    tm(x, scale=2.0, flip=True)
    assert len(state_of(tm).programs) == 3  # (x), (x, float), (x, scale=float, flip=True)
    tm.eval()
    net = Net()
    net.load_state_dict(tm.state_dict())
    assert torch.equal(tm(x, scale=2.0, flip=True), net(x, scale=2.0, flip=True))


@dataclasses.dataclass
class Output:
    sample: torch.Tensor
    note: str


class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


def test_structured_outputs_round_trip():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)])

        def forward(self, x, mode: str = "dict"):
            for b in self.blocks:
                x = b(x)
            if mode == "dict":
                return {"out": x, "aux": [x.sum(), None]}
            return Pair(x, -x)

    torch.utils._pytree.register_dataclass(Output) if hasattr(torch.utils._pytree, "register_dataclass") else None
    tm = treadfx.transform(Net(), start=0, end=1)
    x = torch.randn(2, 6, 4)
    d = tm(x)
    assert set(d) == {"out", "aux"} and d["aux"][1] is None and d["out"].shape == (2, 6, 4)
    p = tm(x, mode="pair")
    assert isinstance(p, Pair) and torch.equal(p.a, -p.b)


def test_tracing_does_not_run_or_mutate_the_model():
    m = small_dit()
    calls = []
    for b in m.blocks:
        b.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    attrs = {name: sorted(mod.__dict__) for name, mod in m.named_modules()}
    trace(m, DiT.forward, inputs(), {}, leaves=list(m.blocks))
    assert calls == []  # blocks are evaluated on fake tensors only (their hooks belong to real calls)
    assert attrs == {name: sorted(mod.__dict__) for name, mod in m.named_modules()}
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_traces_from_fake_inputs_as_torch_compile_provides_them():
    m = small_dit()
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) for a in inputs())
    prog = trace(m, DiT.forward, fake, {}, leaves=list(m.blocks))
    assert signature_of(fake, {}) == signature_of(inputs(), {})
    m.eval()
    assert torch.equal(prog(*inputs()), m(*inputs()))


def test_blocks_found_by_module_structure_and_confirmed_by_graph_hash():
    class Skip(nn.Module):
        def __init__(self, skip):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.skip = nn.Linear(8, 4) if skip else None

        def forward(self, x, s=None):
            if self.skip is not None:
                x = self.skip(torch.cat([x, s], -1))
            return x + self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ins = nn.ModuleList([Skip(False) for _ in range(2)])
            self.mid = Skip(False)
            self.outs = nn.ModuleList([Skip(True) for _ in range(2)])
            self.head = nn.Linear(4, 4)

    net = Net()
    cands = find_block_candidates(net)
    assert [c.path for c in cands] == ["ins.0", "ins.1", "mid", "outs.0", "outs.1"]
    hashes = [block_graph_hash(c.module) for c in cands]
    assert hashes[0] == hashes[1] == hashes[2] and hashes[3] == hashes[4] and hashes[0] != hashes[3]


def test_leaf_modules_are_not_traced_into():
    class Opaque(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > -1e9 else x  # data-dependent: untraceable unless it is a leaf

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = Opaque()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(3)])

        def forward(self, x):
            x = self.pre(x)
            for b in self.blocks:
                x = b(x)
            return x

    # without leaf_modules the data-dependent submodule becomes a live leaf by itself, with a note naming the fix
    with pytest.warns(UserWarning, match=r"`pre` uses tensor data .* leaf_modules=\['pre'\]"):
        auto = treadfx.transform(Net(), start=0, end=1)
        auto(torch.randn(2, 5, 4))
    assert any(n.target == "m.pre" for n in state_of(auto).current.gm.graph.nodes)
    tm = treadfx.transform(Net(), start=0, end=1, leaf_modules=["pre"])
    assert tm(torch.randn(2, 5, 4)).shape == (2, 5, 4)
    assert any(n.target == "m.pre" for n in state_of(tm).current.gm.graph.nodes)


def test_evaluation_inside_a_trace_runs_no_hook_of_inner_modules_and_restores_module_call():
    """Blocks (and the modules inlined around them) are evaluated on fakes mid-trace with fx's patches installed:
    their inner submodules' hooks must not run, and ``nn.Module.__call__`` is the original after the trace."""
    m = small_dit()
    calls = []
    inner = [sub for b in m.blocks for sub in b.modules() if isinstance(sub, nn.Linear)]
    assert inner
    for sub in inner:
        sub.register_forward_pre_hook(lambda *a: calls.append("pre"))
        sub.register_forward_hook(lambda *a: calls.append("post"))
    call_before = nn.Module.__call__
    prog = trace(m, DiT.forward, inputs(), {}, leaves=list(m.blocks))
    assert calls == []
    assert nn.Module.__call__ is call_before
    m.eval()
    with torch.no_grad():
        out = prog(*inputs())  # the traced graph calls the blocks for real: now every hook runs once per call
    assert calls.count("pre") == calls.count("post") == len(inner)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(out, m(*inputs()))
    assert calls.count("pre") == len(inner)


def test_pinned_parameter_fakes_are_reused_and_never_stale():
    """The tracer's evaluator keeps one fake per parameter of the modules it evaluated (the fake mode's own memo
    holds them weakly): a second evaluation at other input shapes reuses it; a module whose parameter was
    replaced by one of another shape gets outputs of the new shape, never the old one."""
    from treadfx.tracing import _PinningEvaluator, make_fake_mode

    import gc

    ev = _PinningEvaluator(make_fake_mode())
    converted = lambda: ev.mode.fake_tensor_converter.meta_converter.hit  # real -> fake conversions so far
    lin = nn.Linear(4, 3)
    out = ev.call_module(lin, (torch.randn(2, 4),), {})
    assert tuple(out.shape) == (2, 3)
    first = converted()
    assert first == 3  # the input, the weight and the bias
    del out
    gc.collect()  # the outputs (and the fakes only they referenced) are gone
    out = ev.call_module(lin, (torch.randn(5, 7, 4),), {})  # other input metadata: evaluated again
    assert tuple(out.shape) == (5, 7, 3)
    assert converted() == first + 1  # only the new input: weight and bias kept their fakes (a plain evaluator: +3)
    lin.weight = nn.Parameter(torch.randn(6, 4))  # same module object, same class: other parameter shapes
    lin.bias = nn.Parameter(torch.randn(6))
    ev._structure.clear()  # (the evaluator caches structure keys per module object within one analysis)
    out = ev.call_module(lin, (torch.randn(2, 4),), {})
    assert tuple(out.shape) == (2, 6)
    assert tuple(ev.to_fake(lin.weight).shape) == (6, 4)


def test_blocks_of_one_class_with_other_parameter_shapes_or_dtypes_are_evaluated_apart():
    """Block outputs are memoised by (module structure, input metadata): the structure includes parameter
    shapes and dtypes, so same-class blocks of another width or dtype are never given a sibling's outputs."""

    class Block(nn.Module):
        def __init__(self, d_in: int, d_out: int, dtype=torch.float32):
            super().__init__()
            self.proj = nn.Linear(d_in, d_out, dtype=dtype)

        def forward(self, x):
            return self.proj(x.to(self.proj.weight.dtype))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            # same class and input metadata for blocks 0/1 and 2/3; 1 differs from 0 in width, 3 from 2 in dtype
            self.blocks = nn.ModuleList([Block(8, 8), Block(8, 12), Block(12, 12), Block(12, 12, torch.float64)])

        def forward(self, x):
            for b in self.blocks:
                x = b(x).float()
            return x

    m = Net()
    prog = trace(m, Net.forward, (torch.randn(2, 5, 8),), {}, leaves=list(m.blocks))
    vals = {n.target: n.meta["val"] for n in prog.gm.graph.nodes if n.op == "call_module"}
    got = [(tuple(vals[f"m.blocks.{i}"].shape), vals[f"m.blocks.{i}"].dtype) for i in range(4)]
    assert got == [((2, 5, 8), torch.float32), ((2, 5, 12), torch.float32), ((2, 5, 12), torch.float32),
                   ((2, 5, 12), torch.float64)]


def test_a_shape_mistake_in_the_users_call_gives_treadfxs_error_without_torchs_fake_tensor_log(caplog):
    """A call whose inputs do not fit the model fails inside the trace: the user sees treadfx's error naming the
    line, not torch's fake-tensor ERROR log before it."""
    import logging

    import pytest
    import torch.nn as nn

    import treadfx

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, bias):
            return x + self.fc(x) * bias  # bias must have the token count

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Linear(4, 8)
            self.blocks = nn.ModuleList([Blk() for _ in range(4)])

        def forward(self, x, bias):
            h = self.e(x)
            for b in self.blocks:
                h = b(h, bias)
            return h

    tm = treadfx.transform(M(), start=1, end=2, ratio=0.5)
    with caplog.at_level(logging.DEBUG, logger="torch._subclasses.fake_tensor"):
        with pytest.raises(treadfx.UntraceableForwardError, match="make sure the model runs eagerly"):
            tm(torch.randn(2, 16, 4), torch.randn(2, 5, 8))  # 5 is no token count of 16
    assert not [r for r in caplog.records if r.name.startswith("torch._subclasses") and r.levelno >= logging.ERROR]
