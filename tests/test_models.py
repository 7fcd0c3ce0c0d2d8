"""The reference backbones themselves: the properties the routing decisions rely on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import treadfx
from treadfx.models.sit_rope import apply_rope, rope_2d_tables, grid_positions, tiny_sit_rope
from treadfx.models.ssm import selective_scan_parallel, selective_scan_sequential, tiny_ssm
from treadfx.models.uvit import tiny_uvit
from treadfx.models.vit import tiny_vit


@settings(max_examples=30)
@given(b=st.integers(1, 3), length=st.integers(1, 12), d=st.integers(1, 5), n=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_parallel_scan_equals_the_recurrence(b, length, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, d, generator=g, dtype=torch.float64)
    dt = torch.rand(b, length, d, generator=g, dtype=torch.float64)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 3
    B = torch.randn(b, length, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, length, n, generator=g, dtype=torch.float64)
    D = torch.randn(d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(selective_scan_parallel(x, dt, A, B, C, D),
                               selective_scan_sequential(x, dt, A, B, C, D), rtol=1e-10, atol=1e-10)


def test_ssm_block_is_order_dependent_and_attention_blocks_are_not():
    """Why the SSM gets sorted kept order: permuting tokens does not permute its block's output."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    perm = torch.randperm(16)
    ssm_block = tiny_ssm(depth=2).blocks[0]
    c = torch.randn(2, 32)
    assert not torch.allclose(ssm_block(x[:, perm], c), ssm_block(x, c)[:, perm], atol=1e-4)
    vit_block = tiny_vit(depth=2).blocks[0]
    torch.testing.assert_close(vit_block(x[:, perm]), vit_block(x)[:, perm], rtol=1e-5, atol=1e-5)


def test_ssm_route_is_sorted_by_default_and_random_on_request():
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, torch.tensor([1, 2])
    auto = treadfx.inspect(treadfx.transform(tiny_ssm(depth=6), start=1, end=4), x, t, y)
    assert auto.routes[0].order == "sorted"
    forced = treadfx.inspect(treadfx.transform(tiny_ssm(depth=6), start=1, end=4, order="random"), x, t, y)
    assert forced.routes[0].order == "random"
    tm = treadfx.transform(tiny_ssm(depth=6), start=1, end=4)
    tm(x, t, y)
    kept = treadfx.last_routes(tm)[0].kept
    assert torch.equal(kept, kept.sort(dim=-1).values)


def test_rope_rotation_preserves_norms_and_relative_positions():
    """RoPE tables: rotation keeps norms; q.k depends only on the position difference."""
    torch.manual_seed(0)
    pos = grid_positions(4)
    cos, sin = rope_2d_tables(pos, 16)
    q = torch.randn(1, 1, 16, 16)
    rq = apply_rope(q, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    shifted = rope_2d_tables(pos + 3, 16)
    v = torch.randn(1, 1, 1, 16).expand(1, 1, 16, 16)
    a = apply_rope(v, cos, sin) @ apply_rope(v, cos, sin).transpose(-1, -2)
    b = apply_rope(v, *shifted) @ apply_rope(v, *shifted).transpose(-1, -2)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factory", [tiny_sit_rope, tiny_ssm, tiny_uvit, tiny_vit])
def test_backbones_keep_the_input_shape(factory):
    m = factory(depth=4)
    x = torch.randn(2, 4, 8, 8)
    out = m(x, torch.rand(2) * 1000, torch.tensor([1, 2]))
    assert out.shape == x.shape
