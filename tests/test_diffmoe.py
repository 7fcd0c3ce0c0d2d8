"""DiffMoE pass (treadfx.diffmoe): layer semantics, predictor, checkpoints, compile, errors, TREAD composition.

Models are tiny (D <= 32) so that 200 hypothesis examples per property stay cheap.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import treadfx
from treadfx.models.dit import DiT, Mlp
from treadfx.moe import DiffMoELayer, diffmoe_layers, expert_capacity
from treadfx.passes.diffmoe import diffmoe_block_indices, tokenwise_mlp_dims

from helpers import dit_inputs, random_dit


def tiny_dit(depth: int = 4, seed: int = 0) -> DiT:
    return random_dit(depth=depth, width_per_head=8, heads=2, patch=2, grid=4, seed=seed)


def layer(dim: int, experts: int, capacity: float = 1.0, noise: float = 0.0, seed: int = 0, **kw) -> DiffMoELayer:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return DiffMoELayer(Mlp(dim, 2 * dim), dim, experts, capacity, noise_std=noise, generator=g, **kw).train()


shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.sampled_from([4, 8]), st.integers(1, 6),
                   st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0]) | st.floats(0.05, 3.0))


# ----------------------------------------------------------------------------------------- layer semantics


@given(shapes, st.integers(0, 2**16))
def test_each_expert_takes_exactly_k_distinct_tokens_in_training(shape, seed):
    B, N, D, E, cap = shape
    m = layer(D, E, cap, seed=seed % 7)
    x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed))
    S = B * N
    k = expert_capacity(S, E, cap)
    assert k == max(1, min(S, int(S / E * cap)))
    out = m(x)
    assert out.shape == x.shape
    assert m._last["counts"].tolist() == [k] * E
    probs = F.softmax(m.gate(x.reshape(S, D)), -1)
    idx, _, mask = m.selection_mask(probs, k)
    assert all(len(set(row.tolist())) == k for row in idx)  # k distinct tokens per expert
    assert mask.sum(0).tolist() == [k] * E and set(mask.unique().tolist()) <= {0.0, 1.0}


@given(st.integers(1, 3), st.integers(1, 9), st.sampled_from([4, 8, 16]), st.integers(0, 2**16))
def test_one_expert_full_capacity_zero_noise_equals_the_ffn(B, N, D, seed):
    # E=1: softmax over one logit is exactly 1.0, k = S so every token is taken once, index_add onto zeros is
    # exact; the expert sees the rows in top-k order, and a BLAS matmul of permuted rows may round differently
    # in the last bit, hence float tolerance rather than bit equality.
    torch.manual_seed(seed)
    ffn = Mlp(D, 2 * D)
    m = DiffMoELayer(ffn, D, 1, 1.0, noise_std=0.0).train()
    x = torch.randn(B, N, D)
    torch.testing.assert_close(m(x), ffn(x), rtol=1e-6, atol=1e-6)


@given(shapes, st.integers(0, 2**16))
def test_training_output_is_permutation_equivariant_over_the_pool(shape, seed):
    B, N, D, E, cap = shape
    m = layer(D, E, cap, noise=0.05, seed=seed % 5)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    S = B * N
    k = expert_capacity(S, E, cap)
    probs = F.softmax(m.gate(x.reshape(S, D)), -1).t().sort(dim=1, descending=True).values
    if k < S:  # ties aside: the k-th and (k+1)-th gate values must be distinguishable
        assume(bool(((probs[:, k - 1] - probs[:, k]) > 1e-5).all()))
    perm = torch.randperm(S, generator=g)
    out = m(x).reshape(S, D)
    out_p = m(x.reshape(S, D)[perm].reshape(B, N, D)).reshape(S, D)  # tokens moved across samples too
    torch.testing.assert_close(out_p, out[perm], rtol=1e-5, atol=1e-6)


@given(shapes, st.integers(0, 2**16))
def test_bce_target_is_the_selection_mask(shape, seed):
    B, N, D, E, cap = shape
    m = layer(D, E, cap, seed=seed % 5, predictor_loss_weight=0.5)
    x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed))
    m(x)
    h = x.reshape(-1, D)
    S = h.shape[0]
    k = expert_capacity(S, E, cap)
    probs = F.softmax(m.gate(h), -1)
    mask = torch.zeros(S, E)  # hand-written expert choice: per expert, its k highest-probability tokens
    for e in range(E):
        mask[probs[:, e].argsort(descending=True, stable=True)[:k], e] = 1.0
    vals = probs.t().sort(dim=1, descending=True).values
    if k < S:
        assume(bool(((vals[:, k - 1] - vals[:, k]) > 1e-6).all()))
    expected = 0.5 * F.binary_cross_entropy_with_logits(m.predictor(h), mask)
    torch.testing.assert_close(m._last["loss"], expected)
    torch.testing.assert_close(treadfx.diffmoe_loss(nn.Sequential(m)), expected)


@given(st.integers(1, 4), st.sampled_from([256, 512]), st.floats(0.05, 0.95), st.floats(-2, 2), st.floats(0.2, 3),
       st.integers(0, 2**16))
@settings(max_examples=40)
def test_thresholds_converge_to_the_quantile_of_a_fixed_score_distribution(E, S, cap_frac, mu, sigma, seed):
    # official EMA: sigmoid space, starts at 0, no bias correction (expected values changed with issue 19)
    m = layer(8, E, seed=0)
    k = max(1, int(S * cap_frac / E))
    g = torch.Generator().manual_seed(seed)
    fixed = mu + sigma * torch.randn(S, E, generator=g)
    q = torch.sigmoid(fixed).t().sort(dim=1, descending=True).values[:, k - 1]
    d = torch.tensor(0.95)
    t = torch.zeros(E)
    for _ in range(6):  # the same batch every step: t_n = t_{n-1} * d + (1 - d) * q, from 0
        m.update_thresholds(fixed, k)
        t = t * d + (1 - d) * q
    assert torch.equal(m.thresholds, t)
    for _ in range(150):  # fresh batches of N(mu, sigma): the EMA settles at sigmoid of the (1 - k/S) quantile
        m.update_thresholds(mu + sigma * torch.randn(S, E, generator=g), k)
    qn = torch.sigmoid(torch.distributions.Normal(mu, sigma).icdf(torch.tensor(1 - (k - 0.5) / S)))
    assert int(m.threshold_steps) == 156
    slope = 0.25 * sigma  # sigmoid is 1/4-Lipschitz
    assert ((m.thresholds - qn).abs() < 0.12 * slope + 0.25 * slope * (k < 8)).all(), (m.thresholds, qn)


def test_eval_counts_come_from_the_predictor_dynamic_equals_masked():
    # official inference: k_e = #(sigmoid(logit) > threshold_e) (was: logit >= threshold, changed with issue 19)
    m = layer(8, 4, noise=0.05)
    x = torch.randn(3, 10, 8)
    for _ in range(30):
        m(torch.randn(3, 10, 8))  # calibrate the thresholds
    m.eval()
    with torch.no_grad():
        dyn = m(x)
        counts = m._last["counts"]
        sig = torch.sigmoid(m.predictor(x.reshape(-1, 8)))
        assert counts.tolist() == (sig > m.thresholds).sum(0).tolist()
        assert 0 < int(counts.sum()) < 4 * 30
        masked = torch.compile(m, fullgraph=True, backend="eager")(x)
    assert m._last["mode"] == "eval (masked)" and m._last["counts"].tolist() == counts.tolist()
    torch.testing.assert_close(masked, dyn, rtol=1e-5, atol=1e-6)


def test_eval_before_any_training_sends_every_token_to_every_expert_or_topk_when_asked():
    # official: thresholds start at 0, so every token passes (was treadfx's top-k fallback, now an option)
    m = layer(8, 4).eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        out = m(x)
        assert m._last["counts"].tolist() == [12] * 4
        h = x.reshape(12, 8)
        probs = F.softmax(m.gate(h), -1)
        ref = sum(probs[:, e, None] * m.experts[e](h) for e in range(4))
        torch.testing.assert_close(out, ref.reshape(2, 6, 8), rtol=1e-6, atol=1e-7)
    t = layer(8, 4, topk_before_calibration=True).eval()
    with torch.no_grad():
        out = t(x)
    k = expert_capacity(12, 4, 1.0)
    assert t._last["counts"].tolist() == [k] * 4
    t.train()
    torch.testing.assert_close(out, t(x))


# ----------------------------------------------------------------------------------------- the pass on models


def test_finds_the_ffn_through_the_graph_and_converts_odd_blocks():
    m = tiny_dit(depth=5)
    d = treadfx.diffmoe(m, num_experts=3, seed=0)
    layers = [n for n, mod in d.named_modules() if isinstance(mod, DiffMoELayer)]
    assert layers == ["blocks.1.mlp", "blocks.3.mlp"] and diffmoe_block_indices(5, True) == [1, 3]
    assert [x.how for x in d._treadfx_diffmoe_matches] == ["graph (torch.fx)"] * 2
    d_all = treadfx.diffmoe(m, num_experts=3, interleave=False, seed=0, example_inputs=dit_inputs(m, 2))
    assert [x.path for x in d_all._treadfx_diffmoe_matches] == [f"blocks.{i}.mlp" for i in range(5)]
    assert {x.how for x in d_all._treadfx_diffmoe_matches} == {"graph (traced on example inputs)"}
    assert tokenwise_mlp_dims(m.blocks[0].attn) is None  # token-mixing: not an FFN
    assert tokenwise_mlp_dims(m.blocks[0].mlp) == (16, 32)


def test_whole_model_with_one_expert_equals_dense_training_forward():
    m = tiny_dit().train()
    d = treadfx.diffmoe(m, num_experts=1, capacity=1.0, noise_std=0.0, interleave=False)
    x, t, y = dit_inputs(m, 3)
    torch.testing.assert_close(d.train()(x, t, y), m(x, t, y), rtol=1e-5, atol=1e-5)


def test_does_not_mutate_the_input_model_unless_inplace():
    m = tiny_dit()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    mlp = m.blocks[1].mlp
    d = treadfx.diffmoe(m, num_experts=2, seed=0)
    d.train()(*dit_inputs(m, 2))
    assert m.blocks[1].mlp is mlp and not any(isinstance(x, DiffMoELayer) for x in m.modules())
    assert m.state_dict().keys() == before.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())
    d2 = treadfx.diffmoe(m, num_experts=2, seed=0, inplace=True)
    assert d2 is m and isinstance(m.blocks[1].mlp, DiffMoELayer)


def test_state_dict_keys_and_checkpoint_round_trip():
    m = tiny_dit()
    d = treadfx.diffmoe(m, num_experts=2, seed=0, shared_expert=True)
    x, t, y = dit_inputs(m, 2)
    d.train()(x, t, y)  # thresholds become non-trivial
    keys = set(d.state_dict())
    dense = set(m.state_dict())
    p = "blocks.1.mlp."
    expected_new = {p + s for s in ["gate.weight", "predictor.0.weight", "predictor.0.bias", "predictor.2.weight",
                                    "predictor.2.bias", "thresholds", "threshold_steps",
                                    "shared_expert.fc1.weight", "shared_expert.fc1.bias",
                                    "shared_expert.fc2.weight", "shared_expert.fc2.bias"]}
    expected_new |= {f"{p}experts.{e}.{s}" for e in range(2) for s in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]}
    for b in (1, 3):
        dense -= {k for k in dense if k.startswith(f"blocks.{b}.mlp.")}
    assert keys == dense | expected_new | {k.replace("blocks.1.", "blocks.3.") for k in expected_new}
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)
    fresh = treadfx.diffmoe(tiny_dit(seed=5), num_experts=2, seed=1, shared_expert=True)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    for mode in ("train", "eval"):
        getattr(d, mode)(), getattr(fresh, mode)()
        with torch.no_grad():
            assert torch.equal(d(x, t, y), fresh(x, t, y)), mode


def test_compiled_training_step_has_no_graph_breaks():
    from torch._dynamo.utils import counters

    m = tiny_dit()
    d = treadfx.diffmoe(m, num_experts=4, seed=0).train()
    x, t, y = dit_inputs(m, 2)
    counters.clear()
    cm = torch.compile(d, fullgraph=True, backend="eager")
    out = cm(x, t, y)
    loss = out.square().mean() + treadfx.diffmoe_loss(d)
    loss.backward()
    assert dict(counters["graph_break"]) == {}
    assert d.blocks[1].mlp.predictor[0].weight.grad is not None and int(d.blocks[1].mlp.threshold_steps) == 1
    eager = treadfx.diffmoe(m, num_experts=4, seed=0).train()
    torch.testing.assert_close(out, eager(x, t, y), rtol=1e-5, atol=1e-6)


def test_stats_activated_flops_equal_a_hand_count():
    m = tiny_dit()
    D, H = 16, 32
    d = treadfx.diffmoe(m, num_experts=4, capacity=1.5, seed=0)
    x, t, y = dit_inputs(m, 3)
    d.train()(x, t, y)
    s = treadfx.diffmoe_stats(d)
    S, E = 3 * 16, 4
    k = int(S / E * 1.5)
    per_token = 2 * D * H + 2 * H * D  # fc1 and fc2, 2 FLOPs per multiply-add
    assert [l.tokens_per_expert for l in s.layers] == [[k] * E] * 2
    assert s.dense_ffn_flops == 2 * S * per_token
    assert s.activated_ffn_flops == 2 * E * k * per_token
    assert s.overhead_flops == 2 * S * (2 * D * E + 2 * D * D + 2 * D * E)
    ffn_params = D * H + H + H * D + D
    moe_params = E * ffn_params + E * D + (D * D + D + D * E + E)
    total = sum(p.numel() for p in m.parameters())
    assert s.total_params == total + 2 * (moe_params - ffn_params)
    assert s.dense_params == total
    assert s.activated_params == total + 2 * (round(E * k / S * ffn_params) - ffn_params + E * D + D * D + D + D * E + E)
    d.eval()(x, t, y)  # eval: what passed the thresholds
    s = treadfx.diffmoe_stats(d)
    for l, (_, mod) in zip(s.layers, [(n, x) for n, x in d.named_modules() if isinstance(x, DiffMoELayer)]):
        assert l.tokens_per_expert == mod._last["counts"].tolist()
        assert l.activated_ffn_flops == sum(l.tokens_per_expert) * per_token
    from torch.utils.flop_counter import FlopCounterMode

    mod = d.blocks[1].mlp
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        mod(torch.randn(2, 8, D))
    eval_counts = mod._last["counts"]
    # FlopCounterMode agrees: experts on their tokens + router + predictor
    assert counter.get_total_flops() == int(eval_counts.sum()) * per_token + 16 * (2 * D * E + 2 * D * D + 2 * D * E)


def test_diffmoe_loss_is_zero_without_layers_or_in_eval():
    m = tiny_dit()
    assert treadfx.diffmoe_loss(m).item() == 0.0
    d = treadfx.diffmoe(m, num_experts=2, seed=0)
    x, t, y = dit_inputs(m, 2)
    d.train()(x, t, y)
    assert treadfx.diffmoe_loss(d).item() > 0
    d.eval()(x, t, y)
    assert treadfx.diffmoe_loss(d).item() == 0.0


# ----------------------------------------------------------------------------------------- errors


class _AttnOnly(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.attn(self.norm(x), self.norm(x), self.norm(x))[0]


class _TwoMlps(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.mlp_a, self.mlp_b = Mlp(d, 16), Mlp(d, 16)

    def forward(self, x):
        return x + self.mlp_a(x) + self.mlp_b(x)


class _Stack(nn.Module):
    def __init__(self, block, n=2):
        super().__init__()
        self.blocks = nn.ModuleList([block() for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=0), "num_experts=0 must be an int >= 1. Fix: e.g. num_experts=8."),
    (dict(num_experts=2.0), "num_experts=2.0 must be an int >= 1. Fix: e.g. num_experts=8."),
    (dict(capacity=0), "capacity=0 must be a number > 0 (experts per token on average; 1.0 keeps the dense FFN "
                       "compute). Fix: e.g. capacity=1.0."),
    (dict(capacity=-0.5), "capacity=-0.5 must be a number > 0 (experts per token on average; 1.0 keeps the dense "
                          "FFN compute). Fix: e.g. capacity=1.0."),
    (dict(threshold_decay=1.0), "threshold_decay=1.0 must be a number in [0, 1) (EMA decay of the capacity "
                                "thresholds). Fix: e.g. threshold_decay=0.95."),
    (dict(noise_std=-1), "noise_std=-1 must be a number >= 0 (relative noise on expert weights). Fix: e.g. "
                         "noise_std=0.01, or 0 for exact copies."),
])
def test_bad_arguments_raise_exact_messages(kwargs, message):
    m = tiny_dit(depth=2)
    with pytest.raises(treadfx.InvalidMoEConfigError) as e:
        treadfx.diffmoe(m, **kwargs)
    assert str(e.value) == message
    assert isinstance(e.value, treadfx.TransformError)


def test_no_or_ambiguous_ffn_raise_exact_messages():
    with pytest.raises(treadfx.FFNNotFoundError) as e:
        treadfx.diffmoe(_Stack(_AttnOnly))
    assert str(e.value) == (
        "block `blocks.1` (_AttnOnly) has no feed-forward submodule: no child is a token-wise MLP (Linear D->H, "
        "activation, Linear H->D) called on the block's [..., D] tokens, and its forward has no such Linear -> "
        "activation -> Linear written inline. Fix: name it with treadfx.diffmoe(..., ffn='<path inside the block>'), "
        "e.g. ffn='mlp'.")
    with pytest.raises(treadfx.FFNNotFoundError) as e:
        treadfx.diffmoe(_Stack(_TwoMlps))
    assert str(e.value) == ("block `blocks.1` (_TwoMlps) has several feed-forward candidates: `mlp_a`, `mlp_b`. "
                            "Fix: name one with treadfx.diffmoe(..., ffn='mlp_a').")
    d = treadfx.diffmoe(_Stack(_TwoMlps), ffn="mlp_b", num_experts=2, seed=0)
    assert isinstance(d.blocks[1].mlp_b, DiffMoELayer) and isinstance(d.blocks[1].mlp_a, Mlp)
    with pytest.raises(treadfx.FFNNotFoundError) as e:
        treadfx.diffmoe(_Stack(_TwoMlps), ffn="ff")
    assert str(e.value) == ("ffn='ff' is not a submodule of block `blocks.1` (_TwoMlps), whose children are: mlp_a, "
                            "mlp_b. Fix: pass the path of the feed-forward module inside each block, e.g. ffn='mlp'.")
    with pytest.raises(treadfx.NoBlocksFoundError):
        treadfx.diffmoe(Mlp(8, 16))


# ----------------------------------------------------------------------------------------- TREAD composition


def _pools(model) -> dict[str, int]:
    return {l.path: l.pool_tokens for l in treadfx.diffmoe_stats(model).layers}


@pytest.mark.parametrize("order", ["diffmoe_then_tread", "tread_then_diffmoe", "tread_then_diffmoe_inplace"])
def test_composes_with_tread_and_experts_see_only_kept_tokens(order):
    m = tiny_dit(depth=6)
    x, t, y = dit_inputs(m, 2)
    B, N, K = 2, 16, 8
    if order == "diffmoe_then_tread":
        out_model = treadfx.transform(treadfx.diffmoe(m, num_experts=2, seed=3), start=1, end=3, ratio=0.5)
    else:
        tm = treadfx.transform(m, start=1, end=3, ratio=0.5)
        tm.train()(x, t, y)  # populate the traced-program cache with the dense FFNs
        out_model = treadfx.diffmoe(tm, num_experts=2, seed=3, inplace=order.endswith("inplace"))
        assert (out_model is tm) == order.endswith("inplace")
    seen = {}
    for name, mod in out_model.named_modules():
        if isinstance(mod, DiffMoELayer):
            mod.register_forward_hook(lambda mod, a, o, name=name: seen.__setitem__(name, tuple(a[0].shape)))
    kept = torch.stack([torch.randperm(N)[:K] for _ in range(B)])
    with treadfx.fixed_routes(out_model, [kept]):
        out = out_model.train()(x, t, y)
    # blocks 1 and 3 are inside the route: their experts pool the B*K kept tokens; block 5 sees all B*N
    assert seen == {"blocks.1.mlp": (B, K, 16), "blocks.3.mlp": (B, K, 16), "blocks.5.mlp": (B, N, 16)}
    assert _pools(out_model) == {"blocks.1.mlp": B * K, "blocks.3.mlp": B * K, "blocks.5.mlp": B * N}
    # same seed, same routes: both orders compute the same thing
    ref = treadfx.transform(treadfx.diffmoe(m, num_experts=2, seed=3), start=1, end=3, ratio=0.5)
    with treadfx.fixed_routes(ref, [kept]):
        torch.testing.assert_close(out, ref.train()(x, t, y))
    out_model.eval()(x, t, y)  # eval: the original forward with the DiffMoE layers (dynamic)


# ----------------------------------------------------------------------------------------- diffusers backbone


def _diffusers_dit():
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=4,
                              sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    for blk in m.transformer_blocks:
        blk.norm1.emb.class_embedder.dropout_prob = 0.0
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.randint(0, 1000, (2,), generator=g),
              class_labels=torch.randint(0, 10, (2,), generator=g))
    return m, kw


def test_diffusers_dit_feedforward_is_found_and_converted():
    m, kw = _diffusers_dit()
    d = treadfx.diffmoe(m, num_experts=2, seed=0)  # diffusers blocks branch on x.ndim: structure decides
    assert [(x.path, x.how) for x in d._treadfx_diffmoe_matches] == [
        ("transformer_blocks.1.ff", "structure"), ("transformer_blocks.3.ff", "structure")]
    d2 = treadfx.diffmoe(m, num_experts=2, seed=0, example_inputs=(), example_kwargs=kw)
    assert {x.how for x in d2._treadfx_diffmoe_matches} == {"graph (traced on example inputs)"}
    out = d.train()(**kw).sample
    assert out.shape == (2, 4, 8, 8) and treadfx.diffmoe_loss(d).item() > 0
    one = treadfx.diffmoe(m, num_experts=1, noise_std=0.0, interleave=False)
    torch.testing.assert_close(one.train()(**kw).sample, m.train()(**kw).sample, rtol=1e-5, atol=1e-5)
    tm = treadfx.transform(d, start=1, end=2, ratio=0.5)
    tm.train()(**kw)
    assert _pools(tm) == {"transformer_blocks.1.ff": 2 * 8, "transformer_blocks.3.ff": 2 * 16}


def test_deepcopy_and_pickle_after_a_training_forward():
    import copy
    import pickle

    d = treadfx.diffmoe(tiny_dit(), num_experts=2, seed=0)
    x, t, y = dit_inputs(d, 2)
    d.train()(x, t, y)
    for clone in (copy.deepcopy(d), pickle.loads(pickle.dumps(d))):
        assert treadfx.diffmoe_loss(clone).item() == 0.0
        with torch.no_grad():
            torch.testing.assert_close(clone.eval()(x, t, y), d.eval()(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("interleave", [True, False])
def test_inspect_reports_the_activated_compute_of_a_training_step(interleave):
    """inspect's planned DiffMoE stats (no real forward) equal those recorded by a real training forward, with the
    experts inside the TREAD route seeing B*K tokens; FLOP totals include the experts."""
    m = tiny_dit(depth=6)
    x, t, y = dit_inputs(m, 3)
    tm = treadfx.transform(treadfx.diffmoe(m, num_experts=4, interleave=interleave), start=1, end=3, ratio=0.5)
    r = treadfx.inspect(tm, x, t, y)
    tm.train()
    tm(x, t, y)
    real = treadfx.diffmoe_stats(tm)
    planned = r.diffmoe
    assert [(l.path, l.pool_tokens, l.tokens_per_expert) for l in planned.layers] == \
        [(l.path, l.pool_tokens, l.tokens_per_expert) for l in real.layers]
    assert (planned.activated_ffn_flops, planned.activated_params, planned.total_params) == \
        (real.activated_ffn_flops, real.activated_params, real.total_params)
    n, k = 16, 8
    assert {l.path: l.pool_tokens for l in planned.layers}["blocks.3.mlp"] == 3 * k
    assert {l.path: l.pool_tokens for l in planned.layers}["blocks.5.mlp"] == 3 * n
    assert "DiffMoE: " in str(r) and r.to_dict()["diffmoe"]["activated_params"] == real.activated_params
    assert treadfx.inspect(treadfx.transform(tiny_dit(depth=6), start=1, end=3), x, t, y).diffmoe is None


def test_inspect_and_its_order_probe_leave_the_last_training_statistics_as_they_were():
    """inspect on a new input signature builds a routed graph, whose order probe runs the routed blocks (with their
    DiffMoE layers) for real in eval mode: the statistics of the user's last training forward survive it."""
    m = tiny_dit(depth=6)
    tm = treadfx.transform(treadfx.diffmoe(m, num_experts=2, seed=0), start=1, end=3, ratio=0.5)
    x, t, y = dit_inputs(m, 2)
    tm.train()(x, t, y)
    layers = diffmoe_layers(tm)
    last = {path: lay._last for path, lay in layers}
    assert {p: v["mode"] for p, v in last.items()} == {"blocks.1.mlp": "train", "blocks.3.mlp": "train",
                                                       "blocks.5.mlp": "train"}
    loss = treadfx.diffmoe_loss(tm)
    stats = treadfx.diffmoe_stats(tm)
    report = treadfx.inspect(tm, *dit_inputs(m, 3))  # batch 3: a new signature, so a new build and order probe
    assert report.routes[0].order == "random"  # the probe ran and found the blocks permutation-equivariant
    assert all(lay._last is last[path] for path, lay in layers)
    assert treadfx.diffmoe_loss(tm) is not None and torch.equal(treadfx.diffmoe_loss(tm), loss)
    assert treadfx.diffmoe_stats(tm) == stats


# ----------------------------------------------------------------------------------------- official reference
# An independent reference of the official DiffMoE layer's algorithm (Shi et al. 2025 and the public description
# of KwaiVGI/DiffMoE's SparseMoEBlock), written per expert with explicit loops; it shares the weights of a
# treadfx layer and keeps its own threshold state.


class OfficialReference:
    def __init__(self, m: DiffMoELayer, capacity: float):
        self.m, self.E, self.capacity = m, m.num_experts, capacity
        self.threshold = torch.zeros(self.E)
        self.decay = torch.tensor([0.95])

    def scores(self, x):
        return torch.softmax(x @ self.m.gate.weight.t(), dim=-1)  # [S, E], input dtype

    def train_step(self, x):
        """Output, per-expert selected token sets, predictor loss; updates the thresholds."""
        S, D = x.shape
        k = int((S / self.E) * self.capacity)
        probs, pred = self.scores(x), self.m.predictor(x.detach())
        y = torch.zeros(S, D)
        chosen, target = [], torch.zeros(S, self.E)
        for e in range(self.E):
            g, idx = torch.topk(probs[:, e], k)
            y = y.index_put((idx,), y[idx] + g[:, None] * self.m.experts[e](x[idx]))
            chosen.append(set(idx.tolist()))
            target[idx, e] = 1.0
        loss = nn.BCEWithLogitsLoss()(pred, target)
        sig = torch.sigmoid(pred.detach())
        for e in range(self.E):
            q = torch.topk(sig[:, e], k).values[-1]
            self.threshold[e] = self.threshold[e] * self.decay + (1 - self.decay) * q
        return y, chosen, loss

    @torch.no_grad()
    def eval_step(self, x):
        S, D = x.shape
        probs, sig = self.scores(x), torch.sigmoid(self.m.predictor(x))
        y = torch.zeros(S, D)
        chosen = []
        for e in range(self.E):
            k_e = int((sig[:, e] > self.threshold[e]).sum())
            g, idx = torch.topk(probs[:, e], k_e)
            y[idx] += g[:, None] * self.m.experts[e](x[idx])
            chosen.append(set(idx.tolist()))
        return y, chosen


def _selected_sets(m: DiffMoELayer, x: torch.Tensor, train: bool) -> list[set]:
    """Token sets each expert took in the last forward, read back through a hook on every expert."""
    sets = [set() for _ in range(m.num_experts)]
    h = x.reshape(-1, x.shape[-1])
    for e in range(m.num_experts):
        rows = m._last["counts"][e]
        del rows
    probs = F.softmax(m.gate(h), -1)
    for e, c in enumerate(m._last["counts"].tolist()):
        sets[e] = set(probs[:, e].topk(int(c)).indices.tolist())
    return sets


@pytest.mark.parametrize("impl", ["grouped", "bmm", "loop"])
@pytest.mark.parametrize("E, cap", [(4, 1.0), (8, 2.0), (16, 1.0)])
def test_training_step_equals_the_official_algorithm(impl, E, cap):
    D, S = 16, 96
    torch.manual_seed(E)
    m = DiffMoELayer(Mlp(D, 2 * D), D, E, cap, noise_std=0.1, experts_impl=impl,
                     generator=torch.Generator().manual_seed(1)).train()
    assert m.grouped_reason == "" or impl == "loop"
    ref = OfficialReference(m, cap)
    x = torch.randn(S, D, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = m(x)
    y, chosen, loss = ref.train_step(x_ref)
    assert torch.equal(out, y)  # bit-equal in fp32
    mask = torch.zeros(S, E)
    for e, c in enumerate(chosen):
        mask[sorted(c), e] = 1.0
    idx, _, got_mask = m.selection_mask(F.softmax(m.gate(x), -1), int(S / E * cap))
    assert torch.equal(got_mask, mask)
    assert torch.equal(m._last["loss"], loss)
    assert torch.equal(m.thresholds, ref.threshold)
    g = torch.randn(S, D)
    params = [p for p in m.parameters()]
    got = torch.autograd.grad((out * g).sum() + m._last["loss"], [x] + params, allow_unused=True)
    want = torch.autograd.grad((y * g).sum() + loss, [x_ref] + params, allow_unused=True)
    for a, b in zip(got, want):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # gradient sums accumulate in another order


@given(st.sampled_from([2, 4, 8]), st.sampled_from([0.5, 1.0, 2.0]), st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_thresholds_and_inference_equal_the_official_algorithm_over_many_batches(E, cap, seed):
    D, S = 8, 40
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = DiffMoELayer(Mlp(D, 2 * D), D, E, cap, noise_std=0.1, generator=g).train()
    ref = OfficialReference(m, cap)
    opt = torch.optim.SGD(m.predictor.parameters(), lr=0.5)
    for step in range(60):
        x = torch.randn(S, D, generator=g)
        if step in (0, 59):  # eval before training (thresholds 0: all tokens) and after calibration
            m.eval()
            with torch.no_grad():
                out = m(x)
            y, chosen = ref.eval_step(x)
            assert torch.equal(out, y)
            assert m._last["counts"].tolist() == [len(c) for c in chosen]
            assert _selected_sets(m, x, False) == chosen
            m.train()
        m(x)
        ref.train_step(x)
        assert torch.equal(m.thresholds, ref.threshold), step
        opt.zero_grad()
        m._last["loss"].backward()  # the predictor learns: thresholds and counts move
        opt.step()
    assert int(m.threshold_steps) == 60


def test_official_and_treadfx_choices_are_options():
    D = 8
    g = lambda: torch.Generator().manual_seed(0)
    off = DiffMoELayer(Mlp(D, 16), D, 4, generator=g())
    assert float(off.predictor[0].bias.abs().max()) == 0 and float(off.predictor[2].bias.abs().max()) == 0
    assert 0.003 < float(off.gate.weight.std()) < 0.009
    tfx = DiffMoELayer(Mlp(D, 16), D, 4, generator=g(), init="treadfx")
    assert 0.012 < float(tfx.gate.weight.std()) < 0.03
    # k clamped to 1..S (treadfx) or the official int(S/E*capacity) (0 for a pool smaller than E)
    assert expert_capacity(3, 8, 1.0) == 1 and expert_capacity(3, 8, 1.0, clamp=False) == 0
    m = layer(D, 8, clamp_k=False)
    m(torch.randn(3, D))
    assert m._last["counts"].tolist() == [0] * 8 and int(m.threshold_steps) == 1
    # fp32 router in bf16 (treadfx) vs softmax in the input dtype (official)
    h = torch.randn(64, D).bfloat16()
    for fp32 in (True, False):
        mm = layer(D, 4, fp32_router=fp32).bfloat16()
        probs = mm._router(h)
        assert probs.dtype == (torch.float32 if fp32 else torch.bfloat16)
        torch.testing.assert_close(probs.float(), F.softmax(mm.gate(h).float(), -1), rtol=0, atol=0 if fp32 else 4e-3)


def _official_schedule(step, E, cap, I, II):
    capacity = cap
    if step <= I:
        capacity = E
    elif step <= II:
        capacity = cap + (E - cap) * (II - step) / (II - I)
    return capacity


@given(st.integers(0, 60), st.sampled_from([2, 4, 8, 16]), st.sampled_from([0.5, 1.0, 2.0]), st.integers(0, 10),
       st.integers(1, 30))
def test_capacity_schedule_equals_the_official_schedule(step, E, cap, dense, ramp):
    from treadfx.moe import scheduled_capacity

    assert scheduled_capacity(step, E, cap, (dense, ramp)) == _official_schedule(step, E, cap, dense, dense + ramp)
    assert scheduled_capacity(step, E, cap, None) == cap
    m = layer(8, E, cap, capacity_schedule=(dense, ramp))
    m.threshold_steps.fill_(step)
    S = 37
    assert m.train_k(S) == max(1, min(S, int(S / E * _official_schedule(step, E, cap, dense, dense + ramp))))
    assert int(m._train_k_tensor(S)) == m.train_k(S)


def test_capacity_schedule_compiles_once_and_equals_eager():
    from torch._dynamo.utils import counters

    D, E = 8, 4
    eager = layer(D, E, 1.0, noise=0.1, capacity_schedule=(2, 4))
    comp = layer(D, E, 1.0, noise=0.1, capacity_schedule=(2, 4))
    comp.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    cm = torch.compile(comp, fullgraph=True, backend="eager")
    ks = []
    for step in range(9):
        x = torch.randn(2, 12, D)
        a = eager(x)
        ks.append(eager._last["counts"].tolist()[0])
        b = cm(x)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert torch.equal(comp.thresholds, eager.thresholds), step
    assert ks == [24, 24, 24, 19, 15, 10, 6, 6, 6]  # dense, linear ramp 4 -> 1, hold
    assert sum(counters["stats"]["unique_graphs"] for _ in [0]) == 1
    assert dict(counters["graph_break"]) == {}


# ----------------------------------------------------------------------------------------- grouped experts


@given(st.integers(1, 6), st.integers(1, 20), st.sampled_from([4, 8, 16, 24]), st.sampled_from([1, 2, 3]),
       st.booleans(), st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_grouped_experts_are_bit_equal_to_the_loop_with_gradients(E, k, D, mult, bias, seed):
    from treadfx.models.dit import Mlp as M

    torch.manual_seed(seed)
    ffn = M(D, mult * D)
    if not bias:
        ffn.fc1.bias = None
    grads = {}
    outs = {}
    x0 = torch.randn(E, k, D)
    for impl in ("loop", "bmm", "grouped"):
        m = DiffMoELayer(ffn, D, E, noise_std=0.2, experts_impl=impl, generator=torch.Generator().manual_seed(seed))
        x = x0.clone().requires_grad_(True)
        y = m.experts_equal_k(x)
        g = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum(),
                                [x] + list(m.experts.parameters()))
        outs[impl], grads[impl] = y, g
    # equal to rounding for every shape (BLAS picks its kernel by shape: one-row and some tiny products round
    # differently); bit-equality on layer-sized problems is checked by test_training_step_equals_the_official_*
    torch.testing.assert_close(outs["grouped"], outs["loop"], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads["grouped"], grads["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # bmm (the fallback without torch._grouped_mm): equal to rounding; BLAS computes a one-row product (k=1) and
    # some small weight gradients with other kernels than the per-expert matmul
    torch.testing.assert_close(outs["bmm"], outs["loop"], rtol=1e-6, atol=1e-6)
    for a, b in zip(grads["bmm"], grads["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_experts_in_bf16_are_close_to_the_loop_and_unsupported_ffns_loop():
    torch.manual_seed(0)
    ffn = Mlp(16, 64).bfloat16()
    x = torch.randn(4, 9, 16).bfloat16()
    y = {impl: DiffMoELayer(ffn, 16, 4, experts_impl=impl, generator=torch.Generator().manual_seed(0)
                            ).experts_equal_k(x) for impl in ("loop", "grouped", "bmm")}
    torch.testing.assert_close(y["grouped"], y["loop"], rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(y["bmm"], y["loop"], rtol=1.6e-2, atol=1e-2)

    class Scaled(nn.Module):  # a parameter outside any Linear: not groupable
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
            self.scale = nn.Parameter(torch.ones(16))

        def forward(self, x):
            return self.fc2(self.fc1(x) * self.scale)

    m = DiffMoELayer(Scaled(), 8, 2)
    assert m.grouped_reason == "the FFN reads a parameter directly (`scale`)"
    assert "experts_impl=loop" in repr(m)


def test_layer_options_reach_every_layer_and_bad_ones_raise_exact_messages():
    m = tiny_dit(depth=2)
    d = treadfx.diffmoe(m, num_experts=2, seed=0, capacity_schedule=(3, 5), experts_impl="loop", static_capacity=2.0)
    lay = d.blocks[1].mlp
    assert (lay.capacity_schedule, lay.experts_impl, lay.static_capacity) == ((3, 5), "loop", 2.0)
    for kw, msg in [(dict(capacity_schedule=(1,)), "capacity_schedule=(1,) must be (dense_steps, ramp_steps)"),
                    (dict(experts_impl="fast"), "experts_impl='fast' must be 'grouped', 'bmm' or 'loop'"),
                    (dict(static_capacity=0), "static_capacity=0 must be a number > 0"),
                    (dict(init="xavier"), "init='xavier' must be 'official' or 'treadfx'")]:
        with pytest.raises(treadfx.InvalidMoEConfigError, match="Fix: e.g.") as e:
            treadfx.diffmoe(m, **kw)
        assert str(e.value).startswith(msg)


def test_the_pass_takes_the_one_public_config_class_and_validates_it():
    """treadfx.passes.diffmoe.DiffMoEConfig is treadfx.DiffMoEConfig (no second class with the same fields); the pass
    refuses anything else and checks the config's values with the same messages as treadfx.diffmoe."""
    from treadfx.passes import diffmoe as pass_module

    assert pass_module.DiffMoEConfig is treadfx.DiffMoEConfig
    cfg = treadfx.DiffMoEConfig(num_experts=2, seed=0, interleave=False, experts_impl="loop")
    p = pass_module.DiffMoEPass(cfg)
    m = tiny_dit(depth=2)
    assert [x.path for x in p.analyse(m)] == ["blocks.0.mlp", "blocks.1.mlp"]
    layers = p.apply(m)
    assert [lay.experts_impl for lay in layers] == ["loop", "loop"] and m.blocks[0].mlp is layers[0]
    with pytest.raises(treadfx.InvalidMoEConfigError, match=r"^num_experts=0 must be an int >= 1. Fix: e.g."):
        pass_module.DiffMoEPass(treadfx.DiffMoEConfig(num_experts=0))
    with pytest.raises(treadfx.TransformError, match=r"DiffMoEPass takes a treadfx.DiffMoEConfig, got dict"):
        pass_module.DiffMoEPass({"num_experts": 2})


def test_static_capacity_eval_compiles_fullgraph_without_recompiles_and_matches_dynamic():
    from torch._dynamo.utils import counters

    m = layer(8, 4, noise=0.1)
    for _ in range(40):
        m(torch.randn(2, 16, 8))
    m.eval()
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        dyn = m(x)
        counts = m._last["counts"].clone()
        m.static_capacity = 4.0  # slots ceil(32 / 4 * 4) = 32: nothing dropped, same tokens as the dynamic mode
        stat = m(x)
        assert m._last["mode"] == "eval (static)" and torch.equal(m._last["counts"], counts)
        torch.testing.assert_close(stat, dyn, rtol=1e-6, atol=1e-7)
        m.static_capacity = 0.5  # 4 slots: each expert keeps its best min(k_e, 4) tokens by router score
        small = m(x)
        assert m._last["counts"].tolist() == counts.clamp(max=4).tolist()
        h = x.reshape(32, 8)
        probs = F.softmax(m.gate(h), -1)
        ref = torch.zeros(32, 8)
        for e, c in enumerate(m._last["counts"].tolist()):
            g, ix = probs[:, e].topk(c)
            ref[ix] += g[:, None] * m.experts[e](h[ix])
        torch.testing.assert_close(small, ref.reshape(2, 16, 8), rtol=1e-6, atol=1e-7)
        torch._dynamo.reset()
        counters.clear()
        cm = torch.compile(m, fullgraph=True, backend="eager")
        for _ in range(3):
            xi = torch.randn(2, 16, 8)
            torch.testing.assert_close(cm(xi), m(xi), rtol=1e-6, atol=1e-7)
        assert counters["stats"]["unique_graphs"] == 1 and dict(counters["graph_break"]) == {}
