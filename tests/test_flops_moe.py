"""FLOPs inside a mixture of experts whose dispatch depends on the data (``y[idx == i] = expert_i(x[idx == i])``).

Fake evaluation sees the number of tokens each expert gets as an unbacked size ``u_i``; the count is a sum of
``u_i`` terms.  ``inspect`` counts it exactly when that holds for every value of the data: the ``u_i`` count the
entries ``idx == i`` of one top-k index tensor, every expert index is covered and the experts cost the same per
token, so the ``u_i`` add up to the tokens dispatched.  Otherwise the submodule is left out of the counts and
``inspect`` names it and says why.  The references here are hand-written formulas and torch's ``FlopCounterMode``
on real forward and backward passes; the analysis never runs the model on stand-in data.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import treadfx
from treadfx.fake_eval import FakeEvaluator
from treadfx.flops import data_dependent_flops

from helpers import dit_inputs, random_dit


class ToyMoE(nn.Module):
    """Top-``k`` of ``len(widths)`` experts (Linear, GELU, Linear of width ``widths[i]``); each token's expert
    outputs are weighted by the gate's softmax scores of its chosen experts."""

    def __init__(self, dim: int, widths=(16, 16), k: int = 1, experts: int | None = None):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(dim, len(widths) if experts is None else experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, w), nn.GELU(), nn.Linear(w, dim)) for w in widths)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        score, idx = self.gate(x).softmax(-1).topk(self.k, dim=-1)
        x = x.repeat_interleave(self.k, dim=0)
        idx = idx.reshape(-1)
        y = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            y[idx == i] = expert(x[idx == i])
        return (y.view(-1, self.k, shape[-1]) * score.unsqueeze(-1)).sum(1).view(shape)


class ExpertAttention(nn.Module):
    """Attention among the tokens of each expert: its FLOPs grow with the square of each expert's token count."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, 2, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        idx = self.gate(x).argmax(-1)
        y = torch.zeros_like(x)
        for i in range(2):
            h = self.proj(x[idx == i])
            y[idx == i] = (h @ h.T).softmax(-1) @ h
        return y


class SignSplit(nn.Module):
    """Tokens split by the sign of a feature, not by expert indices: the split's sizes are not known to add up."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        y = torch.zeros_like(x)
        keep = x[:, 0] > 0
        y[keep] = self.proj(x[keep])
        return y


def _hand(tokens: int, dim: int, width: int, experts: int, k: int, x_grad: bool) -> tuple[int, int]:
    """(forward, backward) FLOPs of ToyMoE with ``experts`` experts of width ``width``, top-``k``, by hand: a matmul
    [m, n] x [n, p] costs 2mnp; the gate is [T, d] x [d, E]; every token goes through k experts, each two matmuls
    [u, d] x [d, h] and [u, h] x [h, d] (u: its tokens), so they cost 4 T k d h whatever the split.  The backward
    computes each weight's gradient (one matmul of the forward's size), and each matmul input's gradient where that
    input needs one: the second expert matmul's input always, the gate's and first expert matmul's when x does."""
    gate, ffn = 2 * tokens * dim * experts, 2 * tokens * k * dim * width
    forward = gate + 2 * ffn
    backward = gate * (1 + x_grad) + ffn * (1 + x_grad) + 2 * ffn
    return forward, backward


def _real_fwd_bwd(m: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """FlopCounterMode's forward and backward counts of ``m(x)`` on real data (gradient of the output's sum with
    respect to the parameters and, if it requires grad, x)."""
    wrt = [p for p in m.parameters()] + ([x] if x.requires_grad else [])
    with FlopCounterMode(display=False) as fwd:
        out = m(x)
    with FlopCounterMode(display=False) as bwd:
        torch.autograd.grad(out.sum(), wrt, allow_unused=True)
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("tokens,dim,width,experts,k,x_grad", [
    (6, 8, 16, 2, 1, True),  # two experts, top-1
    (6, 8, 16, 2, 1, False),
    (5, 4, 8, 3, 2, True),  # top-2 of 3 (tokens repeated k times, as HiDream's training path does)
    (3, 8, 4, 4, 4, False),  # every expert takes every token
])
def test_a_moe_with_identical_experts_is_counted_as_by_hand(tokens, dim, width, experts, k, x_grad):
    torch.manual_seed(0)
    m = ToyMoE(dim, widths=(width,) * experts, k=k)
    x = torch.randn(tokens, dim, requires_grad=x_grad)
    expected = _hand(tokens, dim, width, experts, k, x_grad)
    assert data_dependent_flops(m, (x,), {}) == (*expected, (x_grad,))  # the backward reaches x when it needs it
    # real passes agree whatever the data sends to each expert
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        assert _real_fwd_bwd(m, (torch.randn(tokens, dim, generator=g) * 3).requires_grad_(x_grad)) == expected


def test_without_grad_there_is_no_backward_count():
    m = ToyMoE(8)
    with torch.no_grad():
        assert data_dependent_flops(m, (torch.randn(6, 8),), {}) == (_hand(6, 8, 16, 2, 1, False)[0], 0, (False,))


@pytest.mark.parametrize("module,why", [
    (ToyMoE(8, widths=(16, 32)),
     "the forward FLOPs per token differ between the experts (`== 0`: 512, `== 1`: 1024), so the total depends on "
     "which expert each token picks"),
    (ToyMoE(8, widths=(16,), experts=2),
     "tokens are dispatched by `t == c` for c in [0] only, but the indices t take values in [0, 2), so how many "
     "tokens are counted depends on the data"),
    (ExpertAttention(8), "the count is not linear in the numbers of tokens each expert gets"),
    (SignSplit(8), "is not the number of entries `t == c` of top-k or argmax indices t"),
], ids=["unequal_widths", "uncovered_expert", "quadratic", "not_expert_indices"])
def test_a_count_that_depends_on_the_data_is_refused_with_the_reason(module, why):
    """The per-token forward cost of a width-h expert on d = 8 features is 4 d h (512 for h = 16)."""
    out = data_dependent_flops(module, (torch.randn(6, 8),), {})
    assert isinstance(out, str) and why in out


# ------------------------------------------------------------------ inside a model, through inspect
def _moe_dit(widths) -> nn.Module:
    m = random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4)
    torch.manual_seed(1)
    for blk in m.blocks:
        blk.mlp = ToyMoE(16, widths)
    return m


def _step_flops(model: nn.Module, args: tuple) -> int:
    """FlopCounterMode on a real training-mode forward and the gradient of its output's sum with respect to the
    parameters (counted on a second call: a transformed model's first call may analyse)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    model(*args)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(model(*args).sum(), params)
    return counter.get_total_flops()


@pytest.fixture
def no_synthetic_data(monkeypatch):
    """The analysis must not run the user's code on random stand-in data (FakeEvaluator's last resort)."""

    def refuse(self, module, args, kwargs):
        raise AssertionError(f"{type(module).__name__} was run on synthetic data")

    monkeypatch.setattr(FakeEvaluator, "_real_fallback", refuse)


def test_inspect_counts_moe_feed_forwards_as_real_training_steps_measure_them(no_synthetic_data):
    m = _moe_dit((16, 16))
    args = dit_inputs(m, 2)
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    r = treadfx.inspect(tm, *args)
    assert r.dense_flops == _step_flops(m, args)
    assert r.routed_flops == r.predicted_routed_flops == _step_flops(tm, args) < r.dense_flops
    assert "FLOPs not counted" not in r.sections and "FLOPs not counted" not in str(r)


def test_experts_of_different_widths_are_left_out_and_named(no_synthetic_data):
    m = _moe_dit((16, 32))
    args = dit_inputs(m, 2)
    r = treadfx.inspect(treadfx.transform(m, start=1, end=2, ratio=0.5), *args)
    note = r.sections["FLOPs not counted"]
    assert note.startswith("inside 4 x ToyMoE (`blocks.0.mlp`, `blocks.1.mlp`, ... `blocks.3.mlp`): sizes there "
                           "depend on the data, and the count cannot be exact: the forward FLOPs per token differ "
                           "between the experts (`== 0`: 1024, `== 1`: 2048)")
    assert "FLOPs not counted: inside 4 x ToyMoE" in str(r)
    assert r.dense_flops < _step_flops(m, args)  # the experts' FLOPs are missing from the count
    assert r.routed_flops == r.predicted_routed_flops < r.dense_flops


class SplitMoE(ToyMoE):
    """The same experts, dispatched by sorting the tokens by expert and splitting them by ``bincount(...).tolist()``:
    Python reads the data, so the module runs live and a count on fake tensors cannot see inside it."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        score, idx = self.gate(x).softmax(-1).topk(1, dim=-1)
        idx = idx.view(-1)
        order = idx.argsort()
        sizes = torch.bincount(idx, minlength=len(self.experts)).tolist()
        y = torch.empty_like(x)
        y[order] = torch.cat([e(part) for e, part in zip(self.experts, x[order].split(sizes))])
        return (y * score).view(shape)


def test_a_moe_that_reads_the_data_in_python_is_named_as_left_out():
    m = random_dit(depth=4, width_per_head=8, heads=2, patch=2, grid=4)
    for blk in m.blocks:
        blk.mlp = SplitMoE(16)
    args = dit_inputs(m, 2)
    with warnings.catch_warnings():  # treadfx's note that it runs the module live (tests/test_data_dependent.py)
        warnings.simplefilter("ignore")
        r = treadfx.inspect(treadfx.transform(m, start=1, end=2, ratio=0.5), *args)
    assert r.sections["FLOPs not counted"] == (
        "inside 4 x SplitMoE (`blocks.0.mlp`, `blocks.1.mlp`, ... `blocks.3.mlp`): its code reads tensor values in "
        "Python (`.tolist()`, `.item()`, a branch on data), so it runs live on the data and a count on fake tensors "
        "cannot see inside it. Dense, routed and predicted counts all leave them out alike")
    assert r.dense_flops < _step_flops(m, args)
