"""Unit tests of the layout stage (treadfx.layout) on a tiny traced graph.

The expected layouts are written by hand from the model below, one per op
rule: a cat along the token axis, a slice, a split, the default inheritance,
a block carrying its input, and side inputs found through a cat.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from treadfx.layout import (
    DEFAULT, STREAM_RULES, LayoutAnalysis, Segment, TokenInfo, layout_str, rule_for, side_input_layout,
)
from treadfx.tracing import trace

from helpers import ConditionedBlock


def img(n: int) -> Segment:
    return Segment("image", n)


def txt(n: int) -> Segment:
    return Segment("text", n)


def extra(n: int) -> Segment:
    return Segment("extra", n)


class Tiny(nn.Module):
    """[extra 1 | text 3 | image 6] stream through 3 blocks; an unbatched table of B rows; a RoPE-like table."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.blocks = nn.ModuleList([ConditionedBlock(8) for _ in range(3)])
        self.table = nn.Parameter(torch.randn(2, 6))  # first dim == batch size, but not batched
        self.rope_txt = nn.Parameter(torch.randn(3, 8))
        self.rope_img = nn.Parameter(torch.randn(6, 8))

    def forward(self, x, text, c):
        B = x.shape[0]
        h = torch.cat([self.cls.expand(B, -1, -1), text, self.embed(x)], dim=1)
        p, q = self.table.split(3, dim=1)
        rope = torch.cat([self.rope_txt, self.rope_img], dim=0) * 2
        for b in self.blocks:
            h = b(h, c + p.sum())
        image = h[:, 4:]
        head, rest = h.split([1, 9], dim=1)
        u, v = text.split(4, dim=2)
        return image, rest + rope, torch.flip(h, [1]), head, u + v


ARGS = (torch.randn(2, 6, 4), torch.randn(2, 3, 8), torch.randn(2, 8))


def carry_first_input(node: fx.Node) -> dict[int, fx.Node]:
    """Block carry for these blocks: output 0 carries input 0 (the residual stream)."""
    return {0: node.args[0]}


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    m = Tiny()
    prog = trace(m, Tiny.forward, ARGS, {}, leaves=list(m.blocks))
    nodes = {n.name: n for n in prog.gm.graph.nodes}
    blocks = [n for n in prog.gm.graph.nodes if n.op == "call_module" and ".blocks." in n.target]
    analysis = LayoutAnalysis(prog.gm, 0, blocks, carry_first_input)
    return prog, nodes, blocks, analysis


def split_of(nodes, source: str) -> fx.Node:
    return next(n for n in nodes.values() if n.op == "call_method" and n.target == "split" and n.args[0].name == source)


def elements(nodes, tuple_node: fx.Node) -> list[fx.Node]:
    return sorted((u for u in tuple_node.users if u.target is operator.getitem), key=lambda u: u.args[1])


def test_inputs_are_image_and_text_streams(traced):
    _, nodes, _, a = traced
    assert a.token_info(nodes["args_0"]) == TokenInfo(1, (img(6),), True)
    assert a.token_info(nodes["args_1"]) == TokenInfo(1, (txt(3),), True)
    assert a.token_info(nodes["args_2"]) is None  # [B, D]: no token axis


def test_cat_along_the_token_axis_concatenates_layouts(traced):
    _, nodes, _, a = traced
    # the expanded class token has no layout and no input provenance: a fresh "extra" segment
    assert a.token_info(nodes["cat"]) == TokenInfo(1, (extra(1), txt(3), img(6)), True)


def test_blocks_carry_the_layout_of_their_stream_input(traced):
    _, _, blocks, a = traced
    for b in blocks:
        assert a.token_info(b) == TokenInfo(1, (extra(1), txt(3), img(6)), True)


def test_slice_and_split_cut_the_layout(traced):
    _, nodes, blocks, a = traced
    image = next(u for u in blocks[-1].users if u.target is operator.getitem)
    assert a.token_info(image) == TokenInfo(1, (img(6),), True)
    split = split_of(nodes, blocks[-1].name)
    assert a.info[split] == [TokenInfo(1, (extra(1),), True), TokenInfo(1, (txt(3), img(6)), True)]
    head, rest = elements(nodes, split)
    assert a.token_info(head) == TokenInfo(1, (extra(1),), True)
    assert layout_str(a.token_info(rest).layout) == "[text 3 | image 6]"


def test_ops_without_a_rule_inherit_the_layout_of_a_same_shape_input(traced):
    _, nodes, _, a = traced
    assert a.token_info(nodes["flip"]) == TokenInfo(1, (extra(1), txt(3), img(6)), True)


def test_supporting_a_new_op_is_one_added_rule(traced, monkeypatch):
    """torch.flip along the token axis reverses the layout once a rule says so."""
    prog, nodes, blocks, _ = traced

    def flip_rule(a, node, value):
        src = a.token_info(node.args[0])
        if src is None or list(node.args[1]) != [src.axis]:
            return DEFAULT
        return TokenInfo(src.axis, tuple(reversed(src.layout)), src.batched)

    monkeypatch.setitem(STREAM_RULES, torch.flip, flip_rule)
    assert rule_for(STREAM_RULES, nodes["flip"]) is flip_rule
    a = LayoutAnalysis(prog.gm, 0, blocks, carry_first_input)
    assert a.token_info(nodes["flip"]) == TokenInfo(1, (img(6), txt(3), extra(1)), True)


def test_elements_of_an_unbatched_tuple_are_not_batched(traced):
    """``table.split`` of a [B, 6] parameter gives [B, 3] tensors that carry no batch: the tuple's per-element
    flags [False, False] must not count as "some input is batched"."""
    _, nodes, _, a = traced
    split = split_of(nodes, "m_table")
    assert a.batched[split] == [False, False]
    for e in elements(nodes, split):
        assert a.batched[e] is False
        assert not a.is_batched_value(e, e.meta["val"])


def test_elements_of_a_batched_tuple_are_batched(traced):
    _, nodes, _, a = traced
    split = split_of(nodes, "args_1")
    assert a.batched[split] == [True, True]
    assert all(a.batched[e] is True for e in elements(nodes, split))


def test_side_input_layout_rules(traced):
    prog, nodes, _, _ = traced
    gm = prog.gm
    rope = nodes["mul"]  # cat([rope_txt 3, rope_img 6], dim=0) * 2, walked back to the cat
    assert side_input_layout(gm, rope, 0, 6, []) == (extra(3), img(6))
    assert side_input_layout(gm, rope, 0, 6, [(txt(3), img(6))]) == (txt(3), img(6))  # a known stream layout
    assert side_input_layout(gm, nodes["m_rope_img"], 0, 6, []) == (img(6),)  # the whole axis is image tokens
    assert side_input_layout(gm, rope, 1, 6, []) is None  # 8 features: no rule finds image tokens
    assert side_input_layout(gm, rope, 0, 3, []) == (img(3), extra(6))  # exactly one piece of the image count


class Patchify(nn.Module):
    """A 2x2-patch convolution on a 4x6 image, then ``pre`` and column-major (``transposed``) or row-major tokens."""

    def __init__(self, pre, transposed: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=2, stride=2)
        self.pre, self.transposed = pre, transposed

    def forward(self, x):
        g = self.pre(self.conv(x))  # [B, 8, 2, 3]
        if self.transposed:
            g = g.transpose(2, 3)
        return g.flatten(2).transpose(1, 2)  # [B, 6, 8]


def token_map_of(model: nn.Module):
    from treadfx.patch_map import derive_token_map

    prog = trace(model, type(model).forward, (torch.randn(2, 3, 4, 6),), {}, leaves=[])
    a = LayoutAnalysis(prog.gm, 0, [], lambda n: {})
    stream = next(n for n in prog.gm.graph.nodes if n.op == "output").args[0][0]
    return derive_token_map(prog.gm, a, stream, a.token_info(stream))


def test_token_map_follows_the_shape_ops_from_the_patch_convolution():
    row = token_map_of(Patchify(nn.Identity(), transposed=False))
    assert (row.kind, row.patch, row.grid) == ("patch", (2, 2), (2, 3))
    assert row.order.tolist() == [0, 1, 2, 3, 4, 5]
    col = token_map_of(Patchify(nn.Identity(), transposed=True))
    # token n sits at column n // 2, row n % 2 of the 2x3 grid: row-major patch index row * 3 + column
    assert col.order.tolist() == [0, 3, 1, 4, 2, 5]


def test_a_new_op_on_the_patch_path_is_one_added_replay_rule(monkeypatch):
    from treadfx.patch_map import REPLAY_RULES

    unknown = token_map_of(Patchify(torch.tanh, transposed=False))
    assert unknown.kind == "unknown" and unknown.reason == "`tanh` between the patch embedding and the token stream"
    monkeypatch.setitem(REPLAY_RULES, torch.tanh, lambda node, value, B, D: value)  # elementwise: positions stay
    known = token_map_of(Patchify(torch.tanh, transposed=False))
    assert (known.kind, known.grid, known.order.tolist()) == ("patch", (2, 3), [0, 1, 2, 3, 4, 5])
