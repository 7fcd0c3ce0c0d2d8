"""willisma/SiT with treadfx: the SiT training step (linear interpolant, velocity loss) routed by the one-line
change, and SiT's ODE sampler run mid-training without ``model.eval()``.

Checks: loss and gradients equal a hand-written TREAD forward on the kept indices ``treadfx.last_routes``
reports; sampling in train mode (under ``no_grad``, as the sampler runs) and in eval is the original model;
the step's FLOPs drop by what ``treadfx.inspect`` predicts.
"""

from __future__ import annotations

import torch

import treadfx

from helpers import reference_tread
from integrations.models_common import assert_flop_saving_as_predicted, assert_grads_match, step_flops, step_grads
from integrations.models_sit import euler_sample, tiny_sit, transport_loss

ROUTES = [(1, 4, 0.75)]


def _batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 8, generator=g), torch.randint(0, 10, (3,), generator=g)


def _reference(m, kept):
    def forward(x, t, y):
        return reference_tread(m, x, t, y, ROUTES, [kept]).chunk(2, dim=1)[0]  # SiT drops the sigma half
    return forward


def test_sit_transport_step_equals_hand_written_tread():
    m = tiny_sit()
    tm = treadfx.transform(m, routes=ROUTES)  # <-- the one-line change
    x1, y = _batch()
    tm.train()
    torch.manual_seed(11)
    loss = transport_loss(tm, x1, y)
    (rec,) = treadfx.last_routes(tm)
    assert rec.kept.shape == (3, 4)  # 16 tokens, ratio 0.75: 4 kept
    got = step_grads(loss, tm)
    m.train()
    torch.manual_seed(11)
    ref = transport_loss(_reference(m, rec.kept), x1, y)
    assert torch.equal(loss, ref)
    want = step_grads(ref, m)
    assert_grads_match(got, want)
    # the variance half of the final layer (channels 4..7 of each patch position) gets no gradient, in both
    head = got["final_layer.linear.weight"].view(4, 8, -1)  # [p * p, 2C, D]
    assert head[:, 4:].abs().sum() == 0 and head[:, :4].abs().sum() > 0


def test_sit_sampling_mid_training_is_the_original_model():
    m = tiny_sit()
    tm = treadfx.transform(m, routes=ROUTES)
    x1, y = _batch()
    tm.train()
    transport_loss(tm, x1, y).backward()  # a routed training step first
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    y_nodrop = y.clone()
    m.eval()
    expected = euler_sample(m, z, y_nodrop)
    # SiT's class dropout draws in train mode, so compare the train-mode sample with the original in train mode
    m.train()
    torch.manual_seed(4)
    original_train = euler_sample(m, z, y_nodrop)
    torch.manual_seed(4)
    got_train = euler_sample(tm, z, y_nodrop)
    assert tm.training and treadfx.last_routes(tm) == []
    assert torch.equal(got_train, original_train)
    tm.eval()
    assert torch.equal(euler_sample(tm, z, y_nodrop), expected)


def test_sit_training_step_flops_drop_as_inspect_predicts():
    m = tiny_sit()
    tm = treadfx.transform(m, routes=ROUTES)
    x1, y = _batch()
    report = treadfx.inspect(tm, x1, torch.rand(3), y)
    torch.manual_seed(3)
    routed = step_flops(lambda: transport_loss(tm, x1, y), tm)
    torch.manual_seed(3)
    dense = step_flops(lambda: transport_loss(m, x1, y), m)
    assert_flop_saving_as_predicted(report, dense, routed)
