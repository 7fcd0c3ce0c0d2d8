"""Unit tests of the build pipeline's stages (treadfx.pipeline), the TREAD pass protocol, and the config classes.

Each stage is run on its own on a tiny traced model whose expected artefacts
are written by hand (block paths, layouts, which tensors are gathered and
scattered, the shapes of every node the pass inserts), in the style of
torch's own pass-infrastructure tests; the end-to-end behaviour is covered by
the other test modules.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

import treadfx
from treadfx import pipeline
from treadfx.config import DiffMoEConfig, TreadConfig
from treadfx.layout import Segment
from treadfx.method import method_for
from treadfx.passes.tread import TreadPass, route_selects
from treadfx.transformed import state_of
from treadfx.validate import check_routed_graph

from helpers import ConditionedBlock

STAGE_NAMES = ["trace", "find_chains", "analyse_layout", "plan_routes", "rewrite", "make_live", "validate"]


class Net(nn.Module):
    """x [B, 6, 4] -> embed -> 4 blocks conditioned on c [B, 8]; the blocks see 6 image tokens of width 8."""

    def __init__(self, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([ConditionedBlock(8) for _ in range(depth)])

    def forward(self, x, c):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h, c)
        return h


def args():
    torch.manual_seed(0)
    return torch.randn(2, 6, 4), torch.randn(2, 8)


def request(config: TreadConfig = TreadConfig(start=1, end=2, ratio=0.5), model: nn.Module | None = None,
            method: treadfx.Method | None = None):
    torch.manual_seed(0)
    model = model if model is not None else Net()
    resolved, candidates = config.resolve(model)
    x, c = args()
    return pipeline.BuildRequest(model, resolved, type(model).forward, (x, c), {}, candidates,
                                 method=method if method is not None else treadfx.TreadMethod(config))


# ----------------------------------------------------------------------------------------- the driver


def test_build_runs_the_stages_in_order_and_logs_each(caplog):
    assert [s.__name__ for s in pipeline.STAGES] == STAGE_NAMES
    with caplog.at_level(logging.DEBUG, logger="treadfx"):
        built = pipeline.build(request())
    logged = [r.getMessage().split()[1].rstrip(":") for r in caplog.records if r.name == "treadfx"]
    assert logged == STAGE_NAMES
    assert all(r.getMessage().endswith(" s") for r in caplog.records if r.name == "treadfx")
    assert isinstance(built, pipeline.Built) and built.seconds > 0


def test_an_error_in_the_layout_stage_names_the_stage_and_keeps_its_class_and_message():
    req = request(TreadConfig(start=1, end=2, stream="nope"))
    with pytest.raises(treadfx.StreamAnalysisError) as e:
        pipeline.build(req)
    assert e.value.stage == "analyse_layout"
    assert str(e.value) == ("stream='nope' names no tensor input of forward; its tensor inputs are ['x', 'c']. "
                            "Fix: pass the name of the argument that carries the image (noisy latent).")
    assert e.value.__notes__ == ["treadfx: raised in build stage `analyse_layout` (treadfx.pipeline.analyse_layout)"]
    # the same through the transformed model's first training call
    tm = treadfx.transform(Net(), start=1, end=2, stream="nope")
    with pytest.raises(treadfx.StreamAnalysisError, match="stream='nope' names no tensor input") as e2:
        tm(*args())
    assert e2.value.stage == "analyse_layout"


def test_an_error_in_the_chain_stage_names_that_stage():
    class Skips(Net):
        def forward(self, x, c):  # never calls the blocks
            return self.embed(x)

    with pytest.raises(treadfx.NoBlocksFoundError, match=r"Skips.forward never calls its repeated blocks") as e:
        pipeline.build(request(model=Skips()))
    assert e.value.stage == "find_chains"


# ----------------------------------------------------------------------------------------- each stage


def test_trace_makes_the_blocks_single_calls():
    traced = pipeline.trace(request())
    calls = [str(n.target) for n in traced.program.gm.graph.nodes if n.op == "call_module"]
    assert calls == ["m.embed", "m.blocks.0", "m.blocks.1", "m.blocks.2", "m.blocks.3"]
    assert traced.program.input_names == ["x", "c"]
    assert "treadfx_route" not in traced.original_code
    assert all(c.wl_hash for c in traced.request.candidates)  # every candidate labelled with its kind


def test_find_chains_links_the_four_blocks():
    chains = pipeline.find_chains(pipeline.trace(request()))
    assert [(c.name, c.paths) for c in chains.chains] == [("blocks", [f"blocks.{i}" for i in range(4)])]


def test_analyse_layout_picks_the_image_chain_and_lays_out_the_stream():
    laid = pipeline.analyse_layout(pipeline.find_chains(pipeline.trace(request())))
    assert laid.chain is laid.chains.chains[0]
    embed = laid.chain.nodes[0].args[0]
    assert laid.analysis.token_info(embed).layout == (Segment("image", 6),)
    assert laid.analysis.token_info(laid.chain.nodes[0].args[1]) is None  # c: conditioning, no token axis


def test_plan_routes_gathers_the_stream_passes_the_conditioning_and_scatters_after_the_route():
    planned = pipeline.plan_routes(pipeline.analyse_layout(pipeline.find_chains(pipeline.trace(request()))))
    (plan,) = planned.plans
    blocks = planned.laid.chain.nodes
    assert (plan.start, plan.end, plan.num_tokens, plan.num_keep) == (1, 2, 6, 3)
    assert [(d.node, d.action, d.role) for d in plan.entering] == [
        (blocks[0], "gather", "token stream"), (blocks[0].args[1], "pass", "conditioning")]
    assert [(d.node, d.action, d.role) for d in plan.leaving] == [(blocks[2], "scatter", "token stream")]
    assert (plan.selection, plan.order) == ("per_sample", "random")
    assert planned.token_map is None  # derived at build time only with aux_loss


def test_rewrite_make_live_and_validate():
    planned = pipeline.plan_routes(pipeline.analyse_layout(pipeline.find_chains(pipeline.trace(request()))))
    rewritten = pipeline.rewrite(planned)
    gm = planned.laid.chains.traced.program.gm
    assert rewritten.selects == [gm.treadfx_route0_select]
    names = [n.name for n in gm.graph.nodes if n.op == "call_module" and n.name.startswith("treadfx")]
    assert names == ["treadfx_route0_select", "treadfx_route0_gather0", "treadfx_route0_scatter0"]
    built = pipeline.make_live(rewritten)
    assert built.live.gm is not gm and built.guard.check() is None
    assert pipeline.validate(built) is built


# ----------------------------------------------------------------------------------------- the TREAD pass


def _planned(config: TreadConfig):
    return pipeline.plan_routes(pipeline.analyse_layout(pipeline.find_chains(pipeline.trace(request(config)))))


@pytest.mark.parametrize("selection, kept_shape", [("per_sample", [2, 3]), ("shared", [3])])
def test_tread_pass_returns_a_pass_result_and_values_every_node_it_inserts(selection, kept_shape):
    planned = _planned(TreadConfig(start=1, end=2, ratio=0.5, selection=selection))
    gm = planned.laid.chains.traced.program.gm
    blocks = planned.laid.chain.nodes
    before = set(gm.graph.nodes)
    result = TreadPass(planned.plans, training=True)(gm)
    assert isinstance(result, PassResult) and result.modified is True and result.graph_module is gm
    inserted = {n.name: n for n in gm.graph.nodes if n not in before}
    shapes = {k: (list(n.meta["val"].shape), n.meta["val"].dtype) for k, n in inserted.items()}
    assert shapes == {
        "treadfx_keep": ([2, 6], torch.bool),
        "treadfx_step": ([], torch.int64),
        "treadfx_route0_select": (kept_shape, torch.int64),
        "treadfx_route0_gather0": ([2, 3, 8], torch.float32),  # the kept tokens of the stream
        "treadfx_route0_scatter0": ([2, 6, 8], torch.float32),  # the restored stream
    }
    for name in ("treadfx_route0_select", "treadfx_route0_gather0"):  # attributed to the route-out block
        assert inserted[name].meta["treadfx_scope"] == blocks[1].meta["treadfx_scope"]
    assert inserted["treadfx_route0_scatter0"].meta["treadfx_scope"] == blocks[2].meta["treadfx_scope"]
    assert route_selects(gm, planned.plans) == [gm.treadfx_route0_select]
    assert not hasattr(TreadPass(planned.plans), "selects")  # results come from the graph, not the pass


def test_ensures_rejects_a_gather_that_reads_another_routes_indices():
    planned = _planned(TreadConfig(routes=[(0, 0, 0.5), (2, 3, 0.5)]))
    gm = planned.laid.chains.traced.program.gm
    p = TreadPass(planned.plans)
    p(gm)
    p.ensures(gm)  # as rewritten: every route reads its own indices
    gather1 = next(n for n in gm.graph.nodes if n.name == "treadfx_route1_gather0")
    select0 = next(n for n in gm.graph.nodes if n.name == "treadfx_route0_select")
    gather1.args = (gather1.args[0], select0)
    with pytest.raises(AssertionError, match="treadfx_route1_gather0 of route 1 does not read that route's indices"):
        p.ensures(gm)


def test_validate_checks_outputs_that_are_scatters():
    """A route ending at the last block makes the graph output a scatter; validation compares its shape too."""
    built = pipeline.build(request(TreadConfig(start=1, end=-1)))
    output = next(n for n in built.traced.gm.graph.nodes if n.op == "output")
    out0 = output.args[0][0]
    assert out0.name == "treadfx_route0_scatter0" and list(out0.meta["val"].shape) == [2, 6, 8]
    check_routed_graph(built.traced, built.selects, 1)
    with built.traced.evaluator.mode:
        out0.meta["val"] = torch.empty(2, 5, 8)  # a wrong record is caught, not skipped
    with pytest.raises(treadfx.StreamAnalysisError, match=r"with routing, output 0 has shape \[2, 6, 8\] "
                       r"torch.float32 instead of \[2, 5, 8\] torch.float32"):
        check_routed_graph(built.traced, built.selects, 1)


# ----------------------------------------------------------------------------------------- configs and methods


@pytest.mark.parametrize("kw, error", [
    (dict(ratio=1.5), treadfx.InvalidRatioError),
    (dict(ratio="half"), treadfx.InvalidRatioError),
    (dict(mae_weight=-1.0), treadfx.TransformError),
    (dict(start=1), treadfx.InvalidRouteError),
    (dict(routes=[]), treadfx.InvalidRouteError),
    (dict(routes=[(0, 1)], start=0, end=1), treadfx.InvalidRouteError),
    (dict(start=1, end=2, order="backwards"), treadfx.InvalidRouteError),
    (dict(start=3, end=1), treadfx.InvalidRouteError),
])
def test_tread_config_rejects_what_transform_rejects_with_the_same_error(kw, error):
    with pytest.raises(error) as from_config:
        TreadConfig(**kw).validate()
    with pytest.raises(error) as from_transform:
        treadfx.transform(Net(), **kw)
    assert type(from_config.value) is type(from_transform.value)
    assert str(from_config.value) == str(from_transform.value)


@pytest.mark.parametrize("kw", [dict(start=1, end=4), dict(leaf_modules=["embed.nope"])])
def test_tread_config_checks_the_model_in_resolve(kw):
    with pytest.raises(treadfx.TransformError) as from_config:
        TreadConfig(**kw).resolve(Net())
    with pytest.raises(treadfx.TransformError) as from_transform:
        treadfx.transform(Net(), **kw)
    assert type(from_config.value) is type(from_transform.value)
    assert str(from_config.value) == str(from_transform.value)


@pytest.mark.parametrize("kw, words", [
    (dict(num_experts=0), "num_experts=0 must be an int >= 1. Fix: e.g. num_experts=8."),
    (dict(experts_impl="fast"), "experts_impl='fast' must be 'grouped', 'bmm' or 'loop'."),
    (dict(threshold_decay=1.0), "threshold_decay=1.0 must be a number in [0, 1)"),
])
def test_diffmoe_config_rejects_what_diffmoe_rejects(kw, words):
    with pytest.raises(treadfx.InvalidMoEConfigError) as from_config:
        DiffMoEConfig(**kw).validate()
    with pytest.raises(treadfx.InvalidMoEConfigError) as from_diffmoe:
        treadfx.diffmoe(Net(), **kw)
    assert str(from_config.value) == str(from_diffmoe.value) and str(from_config.value).startswith(words)


def test_diffmoe_names_unknown_options_and_the_config_fields():
    with pytest.raises(treadfx.InvalidMoEConfigError, match=r"unknown option\(s\) \['experts'\]. Fix: use the "
                       r"fields of treadfx.DiffMoEConfig: .*num_experts"):
        treadfx.diffmoe(Net(), experts=4)


def test_transform_and_diffmoe_take_options_by_keyword_only():
    with pytest.raises(TypeError, match="positional argument"):
        treadfx.transform(Net(), 1, 2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="positional argument"):
        treadfx.diffmoe(Net(), 4)  # type: ignore[misc]


def test_apply_with_a_config_is_what_the_sugar_does():
    torch.manual_seed(0)
    m = Net()
    a = treadfx.apply(m, TreadConfig(start=1, end=2, seed=3))
    b = treadfx.transform(m, start=1, end=2, seed=3)
    assert type(state_of(a).method) is treadfx.TreadMethod
    x, c = args()
    assert torch.equal(a(x, c), b(x, c))  # same seeded routes, same graph
    assert [r.kept.tolist() for r in treadfx.last_routes(a)] == [r.kept.tolist() for r in treadfx.last_routes(b)]


def test_apply_refuses_an_unknown_config_naming_the_config_classes():
    with pytest.raises(treadfx.TransformError, match="no treadfx method takes a dict. Fix: pass one of: "
                       "TreadConfig, DiffMoEConfig."):
        method_for({"ratio": 0.5})


class MlpBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h, c):
        return h + self.mlp(h) * c.unsqueeze(1)


def test_apply_with_a_diffmoe_config_is_what_diffmoe_does():
    torch.manual_seed(0)
    m = Net()
    m.blocks = nn.ModuleList([MlpBlock(8) for _ in range(4)])
    a = treadfx.apply(m, DiffMoEConfig(num_experts=2, seed=5))
    b = treadfx.diffmoe(m, num_experts=2, seed=5)
    assert [x.path for x in a._treadfx_diffmoe_matches] == ["blocks.1.mlp", "blocks.3.mlp"]  # interleaved
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(isinstance(blk.mlp, nn.Sequential) for blk in m.blocks)  # the input model is untouched


def test_a_new_method_plugs_in_through_the_override_points(monkeypatch):
    """A third method only subclasses Method: apply() runs check_model, validate, plan, copy, rewrite, finish;
    inspect() asks it for its report section (no edit of treadfx.report)."""
    import treadfx.method as method_module

    calls = []

    @dataclasses.dataclass(frozen=True)
    class ScaleConfig:
        factor: float = 2.0

        def validate(self) -> None:
            calls.append("validate")
            if self.factor <= 0:
                raise treadfx.TransformError("factor must be > 0. Fix: e.g. factor=2.0.")

    class ScaleMethod(treadfx.Method):
        config_class = ScaleConfig
        entry_point = "scale"

        def plan(self, model, example_inputs, example_kwargs):
            calls.append("plan")
            return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]

        def rewrite(self, target, plan):
            calls.append("rewrite")
            for name in plan:
                target.get_submodule(name).weight.data.mul_(self.config.factor)
            return target

        def report_section(self, inspection):
            return {"scale": f"x{self.config.factor:g} on {type(inspection.model).__name__}"}

    monkeypatch.setitem(method_module._REGISTRY, ScaleConfig, ScaleMethod)
    m = Net()
    out = treadfx.apply(m, ScaleConfig(3.0))
    assert calls == ["validate", "plan", "rewrite"]
    assert torch.equal(out.embed.weight, 3.0 * m.embed.weight) and out is not m  # a copy by default
    with pytest.raises(treadfx.TransformError, match="factor must be > 0"):
        treadfx.apply(m, ScaleConfig(-1.0))
    with pytest.raises(treadfx.TransformError, match="scale\\(\\) got a DataParallel wrapper"):
        treadfx.apply(nn.DataParallel(m), ScaleConfig())
    deep = Net(depth=6)  # the paper default route (2..depth-4) needs 6 blocks
    scaled = treadfx.apply(deep, ScaleConfig(3.0))
    report = treadfx.inspect(scaled, *args())  # a plain model: transformed for the report, the scale method kept
    assert report.sections == {"scale": "x3 on Net"} and "  scale: x3 on Net" in str(report).splitlines()
    assert [(r.start, r.end) for r in report.routes] == [(2, 2)] and treadfx.inspect(deep, *args()).sections == {}


# ----------------------------------------------------------------------------------------- a third method


@dataclasses.dataclass(frozen=True)
class MarkedConfig(TreadConfig):
    """TREAD plus an identity op after the first block (a stand-in for a third graph method)."""


class MarkedMethod(treadfx.TreadMethod):
    """Plans like TREAD and, after TREAD's rewrite, inserts ``x * 1`` on the first block's output; reports how many
    marks its graphs hold.  Nothing in treadfx.pipeline or treadfx.report knows this class."""

    config_class = MarkedConfig
    entry_point = "mark"

    def __init__(self, config):
        super().__init__(config)
        self.stages: list[str] = []

    def plan_graph(self, laid):
        self.stages.append("plan_graph")
        return super().plan_graph(laid)

    def rewrite_graph(self, planned):
        self.stages.append("rewrite_graph")
        rewritten = super().rewrite_graph(planned)
        gm = planned.laid.chains.traced.program.gm
        first = planned.laid.chain.nodes[0]
        with gm.graph.inserting_after(first):
            mark = gm.graph.call_function(torch.mul, (first, 1))
        first.replace_all_uses_with(mark, delete_user_cb=lambda u: u is not mark)
        mark.meta["val"] = first.meta["val"]
        mark.meta["treadfx_scope"] = first.meta.get("treadfx_scope")
        gm.recompile()
        return rewritten

    @classmethod
    def found_in(cls, model):
        m = state_of(model).method if treadfx.is_transformed(model) else None
        return m if type(m) is cls else None

    def report_section(self, inspection):
        marks = [n for n in inspection.program.gm.graph.nodes if n.target is torch.mul and n.args[1] == 1]
        return {**super().report_section(inspection), "marks": f"{len(marks)} identity op(s)"}


def _marked_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.mul and n.args[1] == 1]


def test_a_third_graph_method_runs_through_build_by_overriding_plan_graph_and_rewrite_graph(caplog, monkeypatch):
    import treadfx.method as method_module

    config = MarkedConfig(start=1, end=2, seed=4)
    method = MarkedMethod(config)
    with caplog.at_level(logging.DEBUG, logger="treadfx"):
        built = pipeline.build(request(config, method=method))
    assert method.stages == ["plan_graph", "rewrite_graph"]
    assert [r.getMessage().split()[1].rstrip(":") for r in caplog.records if r.name == "treadfx"] == STAGE_NAMES
    gm = built.traced.gm
    (mark,) = _marked_nodes(gm)
    assert mark.args[0] is built.chain.nodes[0] and built.chain.nodes[1].args[0] is not built.chain.nodes[0]
    assert [n.name for n in gm.graph.nodes if n.op == "call_module" and n.name.startswith("treadfx")] == [
        "treadfx_route0_select", "treadfx_route0_gather0", "treadfx_route0_scatter0"]

    # end to end: registered, applied, trained, inspected; outputs bit-equal to TREAD's with the same seed
    monkeypatch.setitem(method_module._REGISTRY, MarkedConfig, MarkedMethod)
    m = Net()
    marked = treadfx.apply(m, config)
    tread = treadfx.transform(m, start=1, end=2, seed=4)
    x, c = args()
    assert torch.equal(marked(x, c), tread(x, c))
    prog = state_of(marked).current
    assert len(_marked_nodes(prog.gm)) == 1 and not _marked_nodes(state_of(tread).current.gm)
    assert state_of(marked).method.stages == ["plan_graph", "rewrite_graph"]
    report = treadfx.inspect(marked, x, c)
    assert report.sections == {"marks": "1 identity op(s)"}
    assert "  marks: 1 identity op(s)" in str(report).splitlines()
    assert [(r.start, r.end, r.num_keep) for r in report.routes] == [(1, 2, 3)]  # TREAD's section, inherited
    assert report.to_dict()["sections"] == {"marks": "1 identity op(s)"}


def test_build_without_a_method_says_which_field_to_set():
    req = request()
    req.method = None
    with pytest.raises(treadfx.TransformError, match=r"BuildRequest.method is None.*Fix: BuildRequest\(\.\.\., "
                       r"method=treadfx.TreadMethod\(config\)\)") as e:
        pipeline.build(req)
    assert e.value.stage == "plan_routes"
