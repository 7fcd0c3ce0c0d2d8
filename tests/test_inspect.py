"""inspect() reports what the pass saw; the CLI prints it; fp32_after_route runs the next block in float32."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

import treadfx
from treadfx.__main__ import main, parse_tensor_spec
from treadfx.models.dit import DiT, dit

from helpers import dit_inputs, random_dit


def small_dit() -> DiT:
    """A depth-6 DiT on a 4x4 grid of 2x2 patches, width 32 (the shared test helper)."""
    return random_dit(depth=6, width_per_head=16, heads=2, patch=2, grid=4, num_classes=10)


def inputs(batch: int = 2):
    return dit_inputs(small_dit(), batch)


def test_report_lists_chain_stream_routes_and_decisions():
    m = small_dit()
    tm = treadfx.transform(m, routes=[(1, 2, 0.5), (4, -1, 0.25)])
    r = treadfx.inspect(tm, *inputs())
    assert [(c.name, c.length, c.selected) for c in r.chains] == [("blocks", 6, True)]
    assert [b["path"] for b in r.chains[0].blocks] == [f"blocks.{i}" for i in range(6)]
    assert r.stream_input == "x" and r.stream_shape == [2, 16, 32] and r.stream_layout == "[image 16]"
    assert [(x.start, x.end, x.num_tokens, x.num_keep) for x in r.routes] == [(1, 2, 16, 8), (4, 5, 16, 12)]
    assert [(x.start_module, x.end_module) for x in r.routes] == [("blocks.1", "blocks.2"), ("blocks.4", "blocks.5")]
    first = r.routes[0]
    assert [(t.action, t.role) for t in first.tensors] == [
        ("gather", "token stream"), ("pass", "conditioning"), ("scatter", "token stream")]
    assert first.tensors[0].name == "output of `blocks.0`" and first.tensors[2].name == "output of `blocks.2`"
    assert first.selection == "per_sample" and first.order == "random"
    assert r.token_map == "patch 2x2 on a 4x4 grid, row-major token order"
    text = str(r)
    assert "route 1: blocks 4..5 (blocks.4 .. blocks.5), ratio 0.25: keep 12 of 16 image tokens" in text
    assert f"ideal speedup {r.ideal_speedup:.3f}x" in text
    assert json.loads(r.to_json())["routes"][1]["num_keep"] == 12


def test_report_leaves_the_model_as_it_was():
    tm = treadfx.transform(small_dit(), start=1, end=3).eval()
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    treadfx.inspect(tm, *inputs())
    assert not tm.training and not any(mod.training for mod in tm.modules())
    assert all(p.grad is None for p in tm.parameters())
    assert all(torch.equal(before[k], v) for k, v in tm.state_dict().items())


def test_inspect_accepts_an_untransformed_model_with_the_paper_default_route():
    r = treadfx.inspect(small_dit(), *inputs())
    assert [(x.start, x.end, x.ratio) for x in r.routes] == [(2, 2, 0.5)]  # 2 .. depth-4 on a depth-6 chain


def test_ideal_speedup_of_the_paper_models():
    """Ideal fwd+bwd FLOP speedups of the paper default route (2..depth-4, r=0.5) at 256 px: DiT-B/2 1.41x, DiT-XL/2
    1.70x (the dense/routed FLOP ratio of the two counted graphs, rounded)."""
    x, t, y = torch.randn(2, 4, 32, 32), torch.rand(2), torch.randint(0, 1000, (2,))
    with torch.device("cpu"):
        b2 = treadfx.inspect(treadfx.transform(dit("B", 2)), x, t, y)
    assert round(b2.ideal_speedup, 2) == 1.41
    assert b2.routes[0].num_keep == 128 and (b2.routes[0].start, b2.routes[0].end) == (2, 8)


def test_cli_inspect_reference_dit_json(capsys):
    code = main(["inspect", "--size", "S", "--patch", "4", "--resolution", "128", "--batch", "2", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stream_shape"] == [2, 16, 384]
    assert data["routes"][0]["start"] == 2 and data["routes"][0]["end"] == 8 and data["routes"][0]["num_keep"] == 8
    assert data["ideal_speedup"] > 1.0


def test_cli_inspect_any_factory(tmp_path):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        from treadfx.models.dit import DiT
        def make():
            return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2, num_classes=10)
    """))
    proc = subprocess.run(
        [sys.executable, "-m", "treadfx", "inspect", "my_models:make", "--input", "2,4,8,8", "--input", "2",
         "--input", "2:long", "--start", "1", "--end", "3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "route 0: blocks 1..3 (blocks.1 .. blocks.3), ratio 0.5: keep 8 of 16 image tokens" in proc.stdout


def test_cli_reports_transform_errors_with_exit_code_2(tmp_path, capsys):
    code = main(["inspect", "--size", "S", "--patch", "8", "--resolution", "128", "--start", "5", "--end", "3"])
    assert code == 2
    assert "InvalidRouteError: route start=5 comes after end=3." in capsys.readouterr().err


def test_parse_tensor_spec():
    assert parse_tensor_spec("2,4,8,8").shape == (2, 4, 8, 8)
    assert parse_tensor_spec("3:long").dtype == torch.int64
    assert parse_tensor_spec("2,5:bool").all()


def test_fp32_after_route_runs_the_next_block_in_float32_without_autocast():
    m = small_dit()
    tm = treadfx.transform(m, start=1, end=2, fp32_after_route=True)
    seen = {}

    def spy(i):
        def hook(mod, args, out):
            seen[i] = (args[0].dtype, torch.is_autocast_enabled("cpu"), out.dtype)
        return hook

    for i in (2, 3, 4):
        tm.blocks[i].register_forward_hook(spy(i))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tm(*inputs())
    assert seen[3] == (torch.float32, False, torch.float32)  # the first block after route-in
    assert seen[2][1] is True and seen[4][1] is True  # autocast is back on for the blocks after it
    plain = treadfx.transform(m, start=1, end=2)
    seen.clear()
    for i in (3,):
        plain.blocks[i].register_forward_hook(spy(i))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain(*inputs())
    assert seen[3][1] is True  # off by default


def test_inspect_of_a_plain_model_whose_chain_is_too_short_for_the_default_route_says_so():
    """A new user inspects the untransformed model first: with 4 blocks the default route 2..-4 is empty, and the
    error says that the route is transform()'s default (the user passed none) and how to pick one."""
    import pytest

    from helpers import tiny_dit, tiny_dit_inputs

    m = tiny_dit(depth=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(treadfx.InvalidRouteError) as e:
        treadfx.inspect(m, *tiny_dit_inputs(batch=2))
    msg = str(e.value)
    assert "chain of 4 blocks" in msg and "default route (start=2, end=-4" in msg
    assert "treadfx.transform(model, start=1, end=-2)" in msg and "start must be <= end" not in msg
    assert not treadfx.is_transformed(m) and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
