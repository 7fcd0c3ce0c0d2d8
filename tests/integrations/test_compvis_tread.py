"""CompVis/tread with treadfx: the authors' DiT trained with the EDM loss, plain (``model=dit``) and transformed
by treadfx, against the same network routed by its own hand-written router (``model=tread``) as the reference.

Builds on tests/test_live_model.py's draw-for-draw test (treadfx's first training call draws what
``argsort(rand(B, N))`` draws), here on the authors' model and router: with the same seed treadfx keeps the
very tokens the official router keeps, in the same order, and the EDM step's loss and gradients are
bit-identical. Also: eval is the original forward; TREAD guidance (``force_routing``) equals the official
``force_routing=True``; FLOPs drop as ``treadfx.inspect`` predicts.

The label embedder's ``assert labels.max() <= 999`` is data-dependent Python: treadfx runs that module live (a
one-time note names ``leaf_modules=["y_embedder"]``, which makes it explicit), so the transform is the one line.
"""

from __future__ import annotations

import torch

import treadfx

from integrations.models_common import assert_flop_saving_as_predicted, step_flops, step_grads
from integrations.models_compvis import EDMPrecond, Router, edm_loss, tiny_tread_dit

START, END, RATIO = 1, 3, 0.5
OFFICIAL_ROUTES = [{"start_layer_idx": START, "end_layer_idx": END, "selection_ratio": RATIO}]


class RecordingRouter(Router):
    def __init__(self):
        self.drawn = []

    def draw(self, x, ratio):
        ids = Router.draw(x, ratio)
        self.drawn.append(ids)
        return ids


def _pair():
    """(official model, routing off; the treadfx-transformed copy sharing its parameters)."""
    m = tiny_tread_dit(enable_routing=False, routes=OFFICIAL_ROUTES)
    tm = treadfx.transform(m, routes=[(START, END, RATIO)])  # <-- the change
    return m, tm


def _batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


def test_edm_step_draws_what_the_official_router_draws_with_bit_identical_loss_and_gradients():
    m, tm = _pair()
    images, labels = _batch()
    tm.train()
    torch.manual_seed(5)
    loss = edm_loss(EDMPrecond(tm), images, labels, class_drop_prob=0.3)  # label drops draw before the route
    rng_after = torch.get_rng_state()
    (rec,) = treadfx.last_routes(tm)
    got = step_grads(loss, tm)

    m.enable_routing, m.router = True, RecordingRouter()  # the official TREAD configuration of the same weights
    m.train()
    torch.manual_seed(5)
    ref = edm_loss(EDMPrecond(m), images, labels, class_drop_prob=0.3)
    assert torch.equal(torch.get_rng_state(), rng_after)
    (official,) = m.router.drawn
    assert official.shape == (4, 8)
    assert torch.equal(rec.kept, official)  # draw for draw, in the router's (unsorted) order
    assert torch.equal(loss, ref)
    want = step_grads(ref, m)
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert (got[name] is None) == (w is None), name
        if w is not None:
            assert torch.equal(got[name], w), name


def test_eval_is_the_original_and_guidance_equals_the_official_forced_route():
    m, tm = _pair()
    images, labels = _batch()
    t = torch.randn(4)
    tm(images, t, labels).sum().backward()  # trace and route once in training first
    tm.eval()
    m.eval()
    with torch.no_grad():
        assert torch.equal(tm(images, t, labels), m(images, t, labels))
        m.router = RecordingRouter()
        torch.manual_seed(9)
        with treadfx.force_routing(tm):
            guided = tm(images, t, labels)
        torch.manual_seed(9)
        official = m(images, t, labels, force_routing=True)
    assert torch.equal(treadfx.last_routes(tm)[0].kept, m.router.drawn[0])
    assert torch.equal(guided, official)


def test_edm_step_flops_drop_as_inspect_predicts():
    m, tm = _pair()
    images, labels = _batch()
    report = treadfx.inspect(tm, images, torch.randn(4), labels)
    assert report.routes[0].num_keep == 8
    torch.manual_seed(2)
    routed = step_flops(lambda: edm_loss(EDMPrecond(tm), images, labels), tm)
    torch.manual_seed(2)
    dense = step_flops(lambda: edm_loss(EDMPrecond(m), images, labels), m)
    assert_flop_saving_as_predicted(report, dense, routed)
