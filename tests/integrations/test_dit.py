"""facebookresearch/DiT with treadfx: the DiT training step (DDPM hybrid loss, label dropout, EMA) routed by
the one-line change ``model = treadfx.transform(model, ...)``.

Checks: the routed step's loss and gradients equal a hand-written TREAD forward on the same kept indices (read
back with ``treadfx.last_routes``) with the same label drops; the EMA copy (``deepcopy`` of the transformed
model, as DiT's ``train.py`` makes it) samples as the original DiT class; the step's FLOPs drop by what
``treadfx.inspect`` predicts.
"""

from __future__ import annotations

import copy

import torch

import treadfx
from treadfx.models.dit import DiT

from helpers import reference_tread
from integrations.models_common import assert_flop_saving_as_predicted, assert_grads_match, step_flops, step_grads
from integrations.models_dit import DDPM, tiny_dit

ROUTES = [(1, 3, 0.5)]


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


def test_dit_training_step_equals_hand_written_tread_and_ema_samples_as_the_original():
    m = tiny_dit()
    tm = treadfx.transform(m, routes=ROUTES)  # <-- the one-line change
    ema = copy.deepcopy(tm).requires_grad_(False)  # DiT's train.py: ema = deepcopy(model) before DDP
    diffusion = DDPM()
    x0, y = _batch()
    tm.train()

    torch.manual_seed(7)
    loss = diffusion.training_loss(tm, x0, y)
    (rec,) = treadfx.last_routes(tm)
    assert rec.kept.shape == (4, 8) and rec.num_tokens == 16
    got = step_grads(loss, tm)

    m.train()
    torch.manual_seed(7)  # the same t, noise and label drops; the reference takes the recorded kept indices
    ref_loss = diffusion.training_loss(lambda xt, t, yy: reference_tread(m, xt, t, yy, ROUTES, [rec.kept]), x0, y)
    assert torch.equal(loss, ref_loss)
    want = step_grads(ref_loss, m)
    assert_grads_match(got, want)
    assert got["blocks.2.attn.qkv.weight"] is not None and got["y_embedder.embedding_table.weight"] is not None

    # one optimizer step and the EMA update of DiT's train.py
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)
    for name, p in tm.named_parameters():
        p.grad = got.get(name)
    opt.step()
    with torch.no_grad():
        for e, p in zip(ema.parameters(), tm.parameters()):
            e.mul_(0.9).add_(p, alpha=0.1)
    # sampling with the EMA (eval, classifier-free guidance) is the original DiT class with the EMA weights
    ema.eval()
    plain = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2, mlp_ratio=2.0,
                class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
    plain.load_state_dict(ema.state_dict())
    plain.eval()
    xt, t = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,))
    z, tt, yy = torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
    with torch.no_grad():
        assert torch.equal(ema.forward_with_cfg(z, tt, yy, 4.0), plain.forward_with_cfg(z, tt, yy, 4.0))
        tm.eval()
        m.eval()
        assert torch.equal(tm(xt, t, y), m(xt, t, y))

def test_dit_training_step_flops_drop_as_inspect_predicts():
    m = tiny_dit()
    tm = treadfx.transform(m, routes=ROUTES)
    diffusion = DDPM()
    x0, y = _batch()
    report = treadfx.inspect(tm, x0, torch.zeros(4, dtype=torch.long), y)
    assert report.routes[0].num_keep == 8
    torch.manual_seed(3)
    routed = step_flops(lambda: diffusion.training_loss(tm, x0, y), tm)
    torch.manual_seed(3)
    dense = step_flops(lambda: diffusion.training_loss(m, x0, y), m)
    assert_flop_saving_as_predicted(report, dense, routed)
