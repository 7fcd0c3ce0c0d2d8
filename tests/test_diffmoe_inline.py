"""DiffMoE on feed-forwards written inline in a block's forward (``self.fc1``, an activation, ``self.fc2`` called
directly, no FFN submodule): the subgraph becomes one DiffMoE layer call; outputs against hand-written references,
gradients, state_dict keys, copies, TREAD and torch.compile; fused (Flux single-block-like) FFNs are refused."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import treadfx
from treadfx.moe import DiffMoELayer, diffmoe_layers

D, H = 16, 32


class _Block(nn.Module):
    """A hand-written DiT-style block: adaLN shift/scale, attention submodule, then ``mlp(h)`` written inline
    (a method of the block, so it is part of the block's own forward, not a submodule)."""

    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False)
        self.ada = nn.Linear(D, 2 * D)

    def pre(self, x, c):
        shift, scale = self.ada(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x, self.norm2(x) * (1 + scale) + shift

    def forward(self, x, c):
        x, h = self.pre(x, c)
        return x + self.mlp(h)


class GeluBlock(_Block):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def mlp(self, h):
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))

    @staticmethod
    def expert(e, h):  # the expert's keys: fc1.*, fc2.*
        return F.linear(F.gelu(F.linear(h, e.fc1.weight, e.fc1.bias), approximate="tanh"), e.fc2.weight, e.fc2.bias)


class SiluModuleBlock(_Block):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(D, H), nn.SiLU(), nn.Linear(H, D)

    def mlp(self, h):
        return self.down(self.act(self.up(h)))

    @staticmethod
    def expert(e, h):
        return F.linear(F.silu(F.linear(h, e.up.weight, e.up.bias)), e.down.weight, e.down.bias)


class SwiGLUBlock(_Block):
    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False)

    def mlp(self, h):
        return self.w2(F.silu(self.w1(h)) * self.w3(h))

    @staticmethod
    def expert(e, h):
        return (F.silu(h @ e.w1.weight.t()) * (h @ e.w3.weight.t())) @ e.w2.weight.t()


class GEGLUChunkBlock(_Block):
    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(D, 2 * H), nn.Linear(H, D)

    def mlp(self, h):
        a, g = self.proj(h).chunk(2, dim=-1)
        return self.out(a * F.gelu(g))

    @staticmethod
    def expert(e, h):
        p = F.linear(h, e.proj.weight, e.proj.bias)
        return F.linear(p[..., :H] * F.gelu(p[..., H:]), e.out.weight, e.out.bias)


class ParamBlock(_Block):
    """``F.linear`` on parameters of the block itself (no nn.Linear)."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(H, D) / D ** 0.5)
        self.b_in = nn.Parameter(torch.randn(H) * 0.1)
        self.w_out = nn.Parameter(torch.randn(D, H) / H ** 0.5)
        self.b_out = nn.Parameter(torch.randn(D) * 0.1)

    def mlp(self, h):
        return F.linear(torch.relu(F.linear(h, self.w_in, self.b_in)), self.w_out, self.b_out)

    @staticmethod
    def expert(e, h):  # the expert's keys: w_in.weight / w_in.bias, w_out.weight / w_out.bias
        return F.linear(torch.relu(F.linear(h, e.w_in.weight, e.w_in.bias)), e.w_out.weight, e.w_out.bias)


KINDS = [GeluBlock, SiluModuleBlock, SwiGLUBlock, GEGLUChunkBlock, ParamBlock]


class Net(nn.Module):
    def __init__(self, block: type, depth: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.emb = nn.Linear(8, D), nn.Linear(1, D)
        self.blocks = nn.ModuleList([block() for _ in range(depth)])
        self.out = nn.Linear(D, 8)

    def forward(self, x, t):
        c = self.emb(t[:, None])
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, c)
        return self.out(h)


def inputs(batch: int = 2, tokens: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, 8, generator=g), torch.rand(batch, generator=g)


def moe_reference(layer: DiffMoELayer, h: torch.Tensor, expert) -> torch.Tensor:
    """The official DiffMoE training step written out per expert: expert e takes the k = int(S / E * capacity)
    pool tokens of highest router probability and adds its output times that probability."""
    x = h.reshape(-1, D)
    S, E = x.shape[0], layer.num_experts
    probs = torch.softmax(x @ layer.gate.weight.t(), dim=-1)
    k = max(1, min(S, int(S / E * layer.capacity)))
    y = torch.zeros_like(x)
    for e in range(E):
        g, idx = probs[:, e].topk(k)
        y = y.index_put((idx,), y[idx] + g[:, None] * expert(layer.experts[e], x[idx]))
    return y.reshape(h.shape)


def reference_forward(dense: Net, moe: Net, x, t, expert) -> torch.Tensor:
    """The converted model by hand: dense blocks from the original model, converted ones as the original block's
    code up to the FFN, then the DiffMoE reference with the converted model's router and experts."""
    c = dense.emb(t[:, None])
    h = dense.inp(x)
    for i, blk in enumerate(dense.blocks):
        if i % 2 == 0:
            h = blk(h, c)
        else:
            h, z = blk.pre(h, c)
            h = h + moe_reference(moe.blocks[i].ffn, z, expert)
    return dense.out(h)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_inline_ffn_becomes_a_diffmoe_layer_equal_to_a_hand_written_reference(kind):
    dense = Net(kind)
    d = treadfx.diffmoe(dense, num_experts=3, capacity=1.0, noise_std=0.05, seed=0)
    assert [p for p, _ in diffmoe_layers(d)] == ["blocks.1.ffn", "blocks.3.ffn"]
    assert {m.how for m in d._treadfx_diffmoe_matches} == {"inline (torch.fx)"}
    assert type(d.blocks[0]) is type(d.blocks[1]) and type(d.blocks[1]).__name__ == kind.__name__
    x, t = inputs()
    d.train()
    dense.train()
    with torch.no_grad():
        torch.testing.assert_close(d(x, t), reference_forward(dense, d, x, t, kind.expert), rtol=1e-5, atol=1e-5)
    # the experts are perturbed copies of the dense FFN (relative noise), not fresh layers
    e0, orig = d.blocks[1].ffn.experts[0], dense.blocks[1]
    dense_w = [p for n, p in orig.named_parameters() if not n.startswith(("attn", "ada"))]
    for a, b in zip(e0.parameters(), dense_w):
        assert a.shape == b.shape and 0 < float((a - b).detach().abs().max()) < 0.5 * float(b.detach().abs().max())


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_full_capacity_exact_copies_equal_the_dense_model(kind):
    """capacity = E: every token goes to every expert; with exact copies the probabilities sum to one, so the
    output is the dense model's, in training and in eval (thresholds 0 before calibration)."""
    dense = Net(kind)
    d = treadfx.diffmoe(dense, num_experts=2, capacity=2.0, noise_std=0.0, interleave=False, seed=0)
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(d.train()(x, t), dense.train()(x, t), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d.eval()(x, t), dense.eval()(x, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [GeluBlock, SwiGLUBlock, ParamBlock], ids=lambda k: k.__name__)
def test_gradients_reach_every_expert_the_router_and_the_predictor(kind):
    d = treadfx.diffmoe(Net(kind), num_experts=3, noise_std=0.05, seed=0).train()
    x, t = inputs()
    (d(x, t).square().mean() + treadfx.diffmoe_loss(d)).backward()
    for _, lay in diffmoe_layers(d):
        for name, p in list(lay.experts.named_parameters()) + list(lay.gate.named_parameters()) + \
                list(lay.predictor.named_parameters()):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_state_dict_keys_copies_and_checkpoints():
    dense = Net(GeluBlock)
    d = treadfx.diffmoe(dense, num_experts=2, noise_std=0.05, seed=0)
    keys = sorted(k.removeprefix("blocks.1.") for k in d.state_dict() if k.startswith("blocks.1."))
    ffn = [f"ffn.experts.{e}.{n}.{w}" for e in range(2) for n in ("fc1", "fc2") for w in ("bias", "weight")]
    assert keys == sorted(["ada.bias", "ada.weight", "attn.in_proj_bias", "attn.in_proj_weight", "attn.out_proj.bias",
                           "attn.out_proj.weight", "ffn.gate.weight", "ffn.predictor.0.bias", "ffn.predictor.0.weight",
                           "ffn.predictor.2.bias", "ffn.predictor.2.weight", "ffn.threshold_steps", "ffn.thresholds"]
                          + ffn)
    assert "blocks.0.fc1.weight" in d.state_dict() and not hasattr(d.blocks[1], "fc1")
    assert "fc1.weight" in dense.blocks[1].state_dict()  # the input model is not mutated
    x, t = inputs()
    d.train()(x, t)
    other = treadfx.diffmoe(Net(GeluBlock, seed=5), num_experts=2, noise_std=0.05, seed=3)
    other.load_state_dict(d.state_dict())
    clones = [other, copy.deepcopy(d), pickle.loads(pickle.dumps(d))]
    with torch.no_grad():
        ref = d.eval()(x, t)
        for m in clones:
            torch.testing.assert_close(m.eval()(x, t), ref, rtol=0, atol=0)
    sp = pickle.loads(pickle.dumps(d))
    assert type(sp.blocks[1]) is type(d.blocks[1]) and isinstance(sp.blocks[1], GeluBlock)


class ModeBlock(GeluBlock):
    def forward(self, x, c):
        x, h = self.pre(x, c)
        if self.training:  # traced as a constant: one graph per mode
            h = h * 0.5
        return x + self.mlp(h)


def test_a_forward_that_branches_on_training_keeps_one_graph_per_mode():
    dense = Net(ModeBlock)
    d = treadfx.diffmoe(dense, num_experts=2, capacity=2.0, noise_std=0.0, seed=0)
    assert set(d.blocks[1]._treadfx_graph_forward.graphs) == {True, False}
    x, t = inputs()
    with torch.no_grad():
        train, ev = d.train()(x, t), d.eval()(x, t)
        torch.testing.assert_close(train, dense.train()(x, t), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ev, dense.eval()(x, t), rtol=1e-5, atol=1e-5)
    assert (train - ev).abs().max() > 1e-3


def test_composes_with_tread_and_the_static_mode_compiles_fullgraph_once():
    dense = Net(GeluBlock, depth=6)
    x, t = inputs()
    for tm in (treadfx.transform(treadfx.diffmoe(dense, num_experts=2, seed=0), start=1, end=3, ratio=0.5),
               treadfx.diffmoe(treadfx.transform(dense, start=1, end=3, ratio=0.5), num_experts=2, seed=0)):
        tm.train()(x, t)
        pools = {l.path: l.pool_tokens for l in treadfx.diffmoe_stats(tm).layers}
        assert pools == {"blocks.1.ffn": 2 * 8, "blocks.3.ffn": 2 * 8, "blocks.5.ffn": 2 * 16}
    d = treadfx.diffmoe(dense, num_experts=2, seed=0, static_capacity=1.5).eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    cm = torch.compile(d, backend=counter, fullgraph=True)
    with torch.no_grad():
        for seed in range(3):
            xi, ti = inputs(seed=seed + 10)
            torch.testing.assert_close(cm(xi, ti), d(xi, ti), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------- refusals


class FluxSingleLike(nn.Module):
    """One Linear computes q, k, v and the MLP input; one Linear takes [attention, MLP] concatenated."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.linear1 = nn.Linear(D, 3 * D + H)
        self.linear2 = nn.Linear(D + H, D)

    def forward(self, x, c):
        qkv, mlp = torch.split(self.linear1(self.norm(x) + c[:, None]), [3 * D, H], dim=-1)
        q, k, v = qkv.chunk(3, dim=-1)
        attn = F.scaled_dot_product_attention(q, k, v)
        return x + self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))


class DiffusersFluxSingleLike(nn.Module):
    """A separate MLP input projection, but the output Linear takes [attention, MLP] concatenated."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.proj_mlp, self.act_mlp = nn.Linear(D, H), nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(D + H, D)

    def forward(self, x, c):
        h = self.norm(x) + c[:, None]
        mlp = self.act_mlp(self.proj_mlp(h))
        attn = self.attn(h, h, h, need_weights=False)[0]
        return x + self.proj_out(torch.cat([attn, mlp], dim=2))


def test_ffns_fused_with_attention_are_refused_with_advice_that_fits():
    with pytest.raises(treadfx.FFNNotFoundError) as e:
        treadfx.diffmoe(Net(FluxSingleLike))
    assert str(e.value) == (
        "block `blocks.1` (FluxSingleLike) has its feed-forward fused with attention: `linear1` computes the MLP "
        "input together with other values (its output is split, and one part goes through the activation). "
        "DiffMoE experts are copies of a separate FFN (Linear D->H, activation, Linear H->D), and these Linears also "
        "compute attention, so no expert can be cut out of them (Flux single-stream blocks are built this way). "
        "Fix: convert a model whose blocks keep the MLP separate, or rewrite the block with separate attention and "
        "MLP Linears first (a Linear on concatenated [attention, MLP] inputs equals the sum of two Linears with its "
        "weight split by columns).")
    with pytest.raises(treadfx.FFNNotFoundError, match=r"fused with attention: `proj_out` takes the MLP hidden "
                                                        r"state concatenated with another tensor .* Fix: "):
        treadfx.diffmoe(Net(DiffusersFluxSingleLike))


class TwoInline(GeluBlock):
    def __init__(self):
        super().__init__()
        self.fc3, self.fc4 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x, c):
        x, h = self.pre(x, c)
        x = x + self.mlp(h)
        return x + self.fc4(F.relu(self.fc3(x)))


class Untraceable(GeluBlock):
    def forward(self, x, c):
        if x.sum() > 0:  # data-dependent Python branch
            x = x * 1.0
        return super().forward(x, c)


def test_several_inline_ffns_one_chosen_by_its_first_linear_and_untraceable_blocks():
    with pytest.raises(treadfx.FFNNotFoundError) as e:
        treadfx.diffmoe(Net(TwoInline))
    assert str(e.value) == ("block `blocks.1` (TwoInline) has several feed-forwards written inline: `fc1` -> `fc2`; "
                            "`fc3` -> `fc4`. Fix: name one by its first Linear with treadfx.diffmoe(..., ffn='fc1').")
    dense = Net(TwoInline)
    d = treadfx.diffmoe(dense, ffn="fc3", num_experts=2, capacity=2.0, noise_std=0.0, seed=0)
    assert hasattr(d.blocks[1], "fc1") and not hasattr(d.blocks[1], "fc3")
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(d.train()(x, t), dense.train()(x, t), rtol=1e-5, atol=1e-5)
    with pytest.raises(treadfx.FFNNotFoundError, match=r"its forward does not trace with torch.fx \(TraceError.*Fix: "
                                                        r"move the feed-forward into a submodule"):
        treadfx.diffmoe(Net(Untraceable))


class DropoutBlock(GeluBlock):
    """Dropout inside the FFN, once as ``F.dropout(..., training=self.training)``, once as an ``nn.Dropout``."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def mlp(self, h):
        return self.drop(self.fc2(F.dropout(F.gelu(self.fc1(h), approximate="tanh"), 0.5, self.training)))


def test_dropout_inside_an_inline_ffn_follows_the_mode():
    dense = Net(DropoutBlock)
    d = treadfx.diffmoe(dense, num_experts=2, capacity=2.0, noise_std=0.0, seed=0)
    expert = d.blocks[1].ffn.experts[0]
    assert [type(m).__name__ for m in expert.children()] == ["Linear", "Dropout", "Linear"]
    assert isinstance(d.blocks[1].drop, nn.Dropout)  # after fc2: not part of the FFN, stays in the block
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(d.eval()(x, t), dense.eval()(x, t), rtol=1e-5, atol=1e-5)
        torch.manual_seed(0)
        a = d.train()(x, t)
        assert (a - d(x, t)).abs().max() > 1e-3  # dropout active in training
