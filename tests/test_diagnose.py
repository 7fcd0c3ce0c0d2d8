"""When a block cannot run on the kept tokens, the UnroutableRegionError names the input that is the problem, why,
and a fix for that case (treadfx.diagnose); inspect lists every token axis a tensor is gathered on, and says why a
table batched on another axis than 0 gets shared selection.  Tiny toy models, seconds each."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import treadfx

D, N, B, T, H = 8, 16, 2, 5, 4


class SideBlock(nn.Module):
    """``kind``: "flat" adds a per-token input passed flattened [B, N*D]; "own" adds its own [N, D] table (and has
    a Linear whose weight is [N, D] too, which is no token table)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(D, D)
        self.pos = nn.Parameter(torch.randn(N, D))
        self.up = nn.Linear(D, N)  # weight [16, 8]: token-sized by coincidence, not a per-token table
        self.down = nn.Linear(N, D)

    def forward(self, x, side=None):
        if self.kind == "flat":
            x = x + side.view(x.shape[0], -1, D)
        if self.kind == "own":
            x = x + self.pos
        return x + self.fc(x) + self.down(F.gelu(self.up(x)))


class SideModel(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(4, D)
        self.cond = nn.Linear(4, D)
        self.blocks = nn.ModuleList([SideBlock(kind) for _ in range(4)])

    def forward(self, x, c):
        h = self.embed(x)
        side = self.cond(c).flatten(1) if self.kind == "flat" else None
        for b in self.blocks:
            h = b(h, side)
        return h


def _refusal(model, *args, **opts) -> str:
    tm = treadfx.transform(model, start=1, end=2, ratio=0.5, **opts)
    with pytest.raises(treadfx.UnroutableRegionError) as e:
        tm(*args)
    return str(e.value)


def test_a_flattened_per_token_input_is_named_with_its_merged_axis_and_the_fix():
    torch.manual_seed(0)
    msg = _refusal(SideModel("flat"), torch.randn(B, N, 4), torch.randn(B, N, 4))
    assert "block `blocks.1` cannot run on the kept tokens" in msg
    assert ("the problem is `flatten` [2, 128]: its axis 1 holds the 16 tokens merged with another axis (16 x 8), "
            "so it cannot be gathered") in msg, msg
    assert "Fix: pass it as [B, N, D]" in msg, msg
    # the operation inside the block that failed, and where
    assert "Error (in `add` at test_diagnose.py:" in msg and "side.view(x.shape[0], -1, D)" in msg, msg


def test_a_blocks_own_per_token_parameter_is_named_not_a_linear_weight_of_the_same_shape():
    torch.manual_seed(0)
    msg = _refusal(SideModel("own"), torch.randn(B, N, 4), torch.randn(B, N, 4))
    assert ("the problem is the block's own parameter `blocks.1.pos` [16, 8]: it is a per-token table inside the "
            "block") in msg, msg
    assert "treadfx cannot gather it" in msg
    assert "Fix: pass it as an input to the block (treadfx then gathers it with the kept tokens) or end the route " \
           "before this block" in msg, msg
    assert "up.weight" not in msg  # [16, 8] too, but cutting it does not let the block run
    assert "Error (in `add` at test_diagnose.py:" in msg and "x = x + self.pos" in msg, msg


class JointBlock(nn.Module):
    """Joint attention over [image N | text T] with a [B, 1, 1, N+T] key mask, and a RoPE table [N, hd] without
    batch dimension used as ``cos.unsqueeze(1)`` against [B, N, H, hd] queries (as HunyuanVideo does)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.o = nn.Linear(D, D)

    def forward(self, x, txt, mask, cos):
        b, n, _ = x.shape
        q = self.qkv(x).view(b, n, 3, H, D // H)[:, :, 0]
        q = q * cos.unsqueeze(1)  # [N, hd] -> [N, 1, hd]; a per-sample [B, K, hd] copy gives [B, 1, K, hd]
        j = torch.cat([x, txt], dim=1)
        k = v = self.qkv(j).view(b, n + txt.shape[1], 3, H, D // H)[:, :, 1].transpose(1, 2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)
        return x + self.o(a.transpose(1, 2).reshape(b, n, D)), txt


class JointModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.blocks = nn.ModuleList([JointBlock() for _ in range(4)])

    def forward(self, x, txt, txt_mask):
        h = self.embed(x)
        n = h.shape[1]
        cos = torch.cos(torch.arange(n, dtype=torch.float32)[:, None] * torch.arange(1, D // H + 1)[None])
        mask = torch.cat([torch.ones(x.shape[0], n, dtype=torch.bool), txt_mask], dim=1)[:, None, None]
        for b in self.blocks:
            h, txt = b(h, txt, mask, cos)
        return h


def _joint_inputs():
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -2:] = False
    return torch.randn(B, N, 4), torch.randn(B, T, D), mask


def test_per_sample_selection_names_the_table_without_batch_dim_not_the_batched_joint_mask():
    """The joint mask [B, 1, 1, N+T] comes before the RoPE table in the block's inputs and lines up with the
    tokens too, but it has a batch dimension and gathers per sample fine: the table is the problem."""
    torch.manual_seed(0)
    msg = _refusal(JointModel(), *_joint_inputs(), selection="per_sample")
    problem = msg.split("; the problem is ", 1)[1].split(". Inputs:")[0]
    assert problem.startswith("`cos` (shape [16, 2]): it lines up with the image tokens ([image 16] on axis 0)"), msg
    assert "[2, 1, 1, 21]" not in problem and "`cat`" not in problem, msg
    assert "treadfx sees no batch dimension in it" in problem, msg
    assert "Fix: Use selection='shared'" in msg, msg
    # and the advice holds: the default (shared for tables without batch dim) routes this model
    torch.manual_seed(0)
    tm = treadfx.transform(JointModel(), start=1, end=2, ratio=0.5)
    assert tm(*_joint_inputs()).shape == (B, N, D)


# ------------------------------------------------------------------ inspect: every token axis, batch axis not 0
class MaskBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x, side, kind):
        if kind == "causal":  # [1, 1, N, N] frame-causal mask
            q = x.view(x.shape[0], x.shape[1], 2, D // 2).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, q, q, attn_mask=side)
            return x + self.fc(a.transpose(1, 2).reshape(x.shape))
        if kind == "pairwise":  # [B, N, N] bias
            return x + torch.bmm(side, x) + self.fc(x)
        return x * (1 + side.transpose(0, 1)) + self.fc(x)  # [N, B, D] modulation


class MaskModel(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(4, D)
        self.cond = nn.Linear(4, D)
        self.blocks = nn.ModuleList([MaskBlock() for _ in range(4)])

    def forward(self, x, c):
        h = self.embed(x)
        n = h.shape[1]
        if self.kind == "causal":
            f = torch.arange(n) // 4
            side = (f[:, None] >= f[None, :])[None, None]
        elif self.kind == "pairwise":
            side = torch.softmax(c @ c.transpose(1, 2), -1)
        else:
            side = self.cond(c).transpose(0, 1).contiguous()
        for b in self.blocks:
            h = b(h, side, self.kind)
        return h


def _gathered_lines(kind):
    torch.manual_seed(0)
    tm = treadfx.transform(MaskModel(kind), start=1, end=2, ratio=0.5)
    report = treadfx.inspect(tm, torch.randn(B, N, 4), torch.randn(B, N, 4))
    side = [t for t in report.routes[0].tensors if t.action == "gather" and t.role != "token stream"]
    assert len(side) == 1, [t for t in report.routes[0].tensors]
    line = next(ln for ln in str(report).splitlines() if ln.strip().startswith("gather") and side[0].name in ln)
    return report, side[0], line


@pytest.mark.parametrize("kind, axes", [("causal", (2, 3)), ("pairwise", (1, 2))])
def test_inspect_lists_every_token_axis_of_a_square_mask(kind, axes):
    _, t, line = _gathered_lines(kind)
    assert t.axes == axes
    assert f"[image {N}] axes {', '.join(map(str, axes))} --" in line, line


def test_modulation_batched_on_axis_1_gets_a_true_reason_for_shared_selection():
    report, t, line = _gathered_lines("nbd")
    r = report.routes[0]
    assert r.selection == "shared"
    assert "`contiguous` [16, 2, 8] has its batch axis on axis 1, not axis 0" in r.selection_reason, r.selection_reason
    assert "no batch dimension" not in r.selection_reason
    assert t.axis == 0 and t.axes is None and f"[image {N}] axis 0 --" in line, line


def test_a_mask_without_batch_dim_still_says_so():
    report, _, _ = _gathered_lines("causal")
    assert report.routes[0].selection == "shared"
    assert "has no batch dimension, so one subset serves the whole batch" in report.routes[0].selection_reason
