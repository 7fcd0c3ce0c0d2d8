"""Lumina2 (Lumina-Image 2.0, diffusers' ``Lumina2Transformer2DModel``) trains routed.

Its main blocks (``layers``) run on a joint sequence that the forward assembles sample by sample:
``joint[i, :c_i] = caption[i, :c_i]; joint[i, c_i:c_i + N] = image[i]``, the rest padding, with the caption
lengths ``c_i`` read from the mask by ``.tolist()`` in the RoPE embedder.  Checked here against a hand-written
forward-hook reference: with the same kept image indices, each sample keeps its caption and padding and K of
its N image tokens at its own offset; the rotary rows and the joint attention mask are gathered at the same
positions; a new caption length does not retrace (the offsets are read at every call), only a new padded length
or a change between equal and unequal lengths (a new shape, or the mask appearing) does.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import treadfx
import treadfx.tracing
from treadfx.transformed import state_of
from treadfx.windows import WindowIndex

from helpers import tiny_lumina2, tiny_lumina2_inputs

pytest.importorskip("diffusers")

N = 16  # image tokens: 8x8 latent, patch 2


def _positions(kept: torch.Tensor, caps: list[int], length: int) -> list[torch.Tensor]:
    """Joint positions a route keeps in each sample: the caption, the kept image tokens at the sample's offset,
    the padding (written out by hand, independently of treadfx)."""
    return [torch.cat([torch.arange(c), c + kept[i], torch.arange(c + N, length)]) for i, c in enumerate(caps)]


def _reference(m, args, kept: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The original model with forward hooks on ``layers``: route-out before ``start`` (stream, mask and rotary
    rows gathered per sample), mask and rotary rows gathered for the later routed blocks, route-in after ``end``."""
    caps = args[3].sum(dim=1).tolist()
    saved = {}

    def take(x, pos):
        return None if x is None else torch.stack([x[i, p] for i, p in enumerate(pos)])

    def route_out(mod, a):
        h, mask, rope, temb = a
        pos = _positions(kept, caps, h.shape[1])
        saved.update(h=h, pos=pos)
        return take(h, pos), take(mask, pos), take(rope, pos), temb

    def side(mod, a):
        h, mask, rope, temb = a
        return h, take(mask, saved["pos"]), take(rope, saved["pos"]), temb

    def route_in(mod, a, out):
        full = saved["h"].clone()
        for i, p in enumerate(saved["pos"]):
            full[i, p] = out[i]
        return full

    hooks = [m.layers[start].register_forward_pre_hook(route_out)]
    hooks += [m.layers[k].register_forward_pre_hook(side) for k in range(start + 1, end + 1)]
    hooks.append(m.layers[end].register_forward_hook(route_in))
    try:
        return m(*args).sample
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture
def traces(monkeypatch):
    """Counts the traces of a transformed model's forward (not the per-block analyses)."""
    count = [0]
    original = treadfx.tracing.trace

    def counting(model, *a, **k):
        if treadfx.is_transformed(model):
            count[0] += 1
        return original(model, *a, **k)

    monkeypatch.setattr(treadfx.tracing, "trace", counting)
    return count


def _step_flops(fn) -> int:
    """FLOPs of a forward and backward (torch's FlopCounterMode on real tensors), counted on a second call."""
    from torch.utils.flop_counter import FlopCounterMode

    fn().sample.sum().backward()
    with FlopCounterMode(display=False) as counter:
        fn().sample.sum().backward()
    return counter.get_total_flops()


def test_inspect_routes_the_joint_layers_and_says_what_is_gathered_and_why():
    m = tiny_lumina2()
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5)
    args = tiny_lumina2_inputs([5, 7], torch.Generator().manual_seed(0))
    r = treadfx.inspect(tm, *args)
    chains = {c.name: c for c in r.chains}
    assert [(c.name, c.length) for c in r.chains if c.selected] == [("layers", 5)]
    assert "carries the image tokens to the output" in chains["layers"].note
    assert "refiner" in chains["noise_refiner"].note and "written into the input of `layers`" in chains["noise_refiner"].note
    assert "receive no image tokens" in chains["context_refiner"].note  # its caption rotary rows do not count
    (route,) = r.routes
    assert (route.start, route.end, route.num_tokens, route.num_keep, route.selection) == (1, 3, N, N // 2, "per_sample")
    assert "per-sample offsets [" in route.selection_reason and "keeps its caption and padding" in route.selection_reason
    decisions = {(t.action, t.role) for t in route.tensors}
    assert decisions >= {("gather", "token stream"), ("scatter", "token stream"), ("pass", "conditioning")}
    gathered = {t.name: t for t in route.tensors if t.action == "gather"}
    assert any("rope_embedder" in name for name in gathered)  # the joint rotary rows
    # the joint attention mask is named by what it is (the forward builds it with new_zeros), not by its graph op
    (mask,) = [t for name, t in gathered.items() if "new_zeros" in name]
    assert mask.name.startswith("joint attention mask built in forward") and mask.role == "side input"
    # every tensor on the joint axis shows the caption | image | padding split, not the stream's token count
    joint = [t for t in route.tensors if t.action in ("gather", "scatter")]
    assert {t.layout for t in joint} == {f"[caption | image {N} | padding] joint sequence of {N + 7} tokens, image "
                                         "tokens at per-sample offsets"}
    assert "[image 23]" not in str(r)
    assert all("joint positions" in t.reason for t in route.tensors if t.action in ("gather", "scatter"))
    assert r.routed_flops == r.predicted_routed_flops < r.dense_flops
    # a real training call costs what inspect predicts, and the original model what it counts as dense
    assert _step_flops(lambda: tm(*args)) == r.routed_flops and _step_flops(lambda: m(*args)) == r.dense_flops
    text = str(r)
    assert "keep 8 of 16 image tokens" in text and "`layers`" in text


def test_routed_training_equals_the_hook_reference_for_every_caption_length(traces):
    m = tiny_lumina2()
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5)
    g = torch.Generator().manual_seed(1)
    programs = set()
    for lengths in ([5, 8], [3, 8], [8, 1], [8, 8], [2, 8], [8, 3]):
        args = tiny_lumina2_inputs(lengths, g)
        out = tm(*args).sample
        (rec,) = treadfx.last_routes(tm)
        assert rec.kept.shape == (2, N // 2) and rec.num_tokens == N and int(rec.kept.max()) < N
        assert torch.equal(out, _reference(m, args, rec.kept, 1, 3))
        out.square().mean().backward()
        programs.add(id(state_of(tm).current))
    # one graph per padded length (16 + 8 here) and equal/unequal caption lengths (the joint mask is passed or
    # not), never one per tuple of caption lengths
    assert traces[0] == len(programs) == 2


def test_fixed_image_indices_keep_caption_and_padding_at_each_sample_offset():
    m = tiny_lumina2()
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    args = tiny_lumina2_inputs([3, 6], torch.Generator().manual_seed(2))
    kept = torch.stack([torch.arange(N - 1, -1, -2), torch.arange(0, N, 2)])  # [B, K] image-token indices
    seen = {}
    h0 = tm.layers[0].register_forward_hook(lambda mod, a, out: seen.update(full=out))
    h1 = tm.layers[1].register_forward_pre_hook(lambda mod, a: seen.update(routed=a[0], mask=a[1], rope=a[2]))
    try:
        with treadfx.fixed_routes(tm, [kept]):
            out = tm(*args).sample
    finally:
        h0.remove()
        h1.remove()
    length = 6 + N
    pos = _positions(kept, [3, 6], length)
    assert seen["routed"].shape == (2, length - N + N // 2, 32)
    for i, p in enumerate(pos):
        assert torch.equal(seen["routed"][i], seen["full"][i, p])
        # every caption and padding position is there, in order, and exactly K image tokens
        assert p[:[3, 6][i]].tolist() == list(range([3, 6][i])) and p[-(length - N - [3, 6][i]) or len(p):].tolist() \
            == list(range([3, 6][i] + N, length))
    assert seen["mask"].shape == (2, length - N + N // 2) and seen["rope"].shape[1] == length - N + N // 2
    assert torch.equal(seen["mask"][0], torch.tensor([True] * (3 + N // 2) + [False] * 3))  # padding stays masked
    assert torch.equal(out, _reference(m, args, kept, 1, 2))


def test_eval_is_the_original_forward_bit_for_bit():
    m = tiny_lumina2()
    tm = treadfx.transform(m, start=1, end=-2, ratio=0.5)
    g = torch.Generator().manual_seed(3)
    tm(*tiny_lumina2_inputs([4, 8], g)).sample.mean().backward()  # a routed training step first
    tm.eval()
    m.eval()
    with torch.no_grad():
        for lengths in ([4, 8], [2, 5], [6, 6]):
            args = tiny_lumina2_inputs(lengths, g)
            assert torch.equal(tm(*args).sample, m(*args).sample)


def test_a_new_padded_length_traces_once_and_a_new_caption_length_not_at_all(traces):
    m = tiny_lumina2(layers=4)
    tm = treadfx.transform(m, start=1, end=2, ratio=0.5)
    g = torch.Generator().manual_seed(4)
    for lengths in ([2, 8], [5, 8], [8, 1], [8, 6]):
        tm(*tiny_lumina2_inputs(lengths, g))
    assert traces[0] == 1
    prog = state_of(tm).current
    args = tiny_lumina2_inputs([3, 7], g)  # a shorter padded length: a new shape
    out = tm(*args).sample
    assert traces[0] == 2
    assert torch.equal(out, _reference(m, args, treadfx.last_routes(tm)[0].kept, 1, 2))
    tm(*tiny_lumina2_inputs([8, 4], g))  # back to the first graph, no trace
    assert traces[0] == 2 and state_of(tm).current is prog


@st.composite
def _windows(draw):
    b = draw(st.integers(1, 4))
    n = draw(st.integers(1, 12))
    k = draw(st.integers(1, n))
    pad = draw(st.integers(0, 6))  # L = N + longest caption + extra padding
    caps = draw(st.lists(st.integers(0, 6), min_size=b, max_size=b))
    length = n + max(caps) + pad
    kept = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))[:k]
                        for _ in range(b)])
    return n, length, caps, kept


@settings(max_examples=60, deadline=None)
@given(_windows())
def test_window_index_keeps_caption_and_padding_and_shifts_kept_image_tokens(case):
    n, length, caps, kept = case
    got = WindowIndex(n, length)(kept, *caps)
    want = torch.stack([torch.cat([torch.arange(c), c + kept[i], torch.arange(c + n, length)])
                        for i, c in enumerate(caps)])
    assert torch.equal(got, want)
    assert WindowIndex(n, length)(None, *caps) is None


def test_compiled_routed_training_equals_eager_and_new_caption_lengths_stop_recompiling(fresh_dynamo):
    """torch.compile of the routed Lumina2: the compiled step equals the eager routed model on the same kept
    indices, and the caption lengths become dynamic ints: after each sample's length has changed once, new lengths
    (same padded length) compile nothing.  A new padded length, or captions of one length (Lumina2 then drops its
    mask), needs another traced variant: the compiled model switches to it (traced eagerly, compiled once) and
    back, each result equal to eager.  Graph breaks: diffusers' own ``.tolist()`` of the mask and the variant
    dispatch (a frame dynamo skips, so that a guard failure can switch variants); then, once a guard fails, the
    guard's raise.

    Dynamo's "eager" backend: what is checked here (graphs, recompiles, graph breaks, variant switching) is
    dynamo's, the same under any backend, and aot_eager recompiled each new dynamic shape about ten times slower
    (this was the suite's slowest test).  The aot_eager forward and backward of the routed Lumina2 are checked by
    the next test."""
    from torch._dynamo.utils import counters

    m = tiny_lumina2(layers=3)
    tm = treadfx.transform(m, start=1, end=1, ratio=0.5)
    g = torch.Generator().manual_seed(5)
    cm = torch.compile(tm, backend="eager")
    graphs = []

    def step(lengths, backward=True):
        args = tiny_lumina2_inputs(lengths, g)
        out = cm(*args).sample
        kept = [rec.kept for rec in treadfx.last_routes(tm)]
        with treadfx.fixed_routes(tm, kept):
            eager = tm(*args).sample
        assert torch.equal(out, eager), lengths
        if backward:
            out.square().mean().backward()
        graphs.append(counters["stats"]["unique_graphs"])

    for lengths in ([5, 8], [3, 8], [8, 6], [4, 8]):  # padded length 8 + 16 (0 and 1 avoided: dynamo pins them)
        step(lengths)
    # dynamo specialises a new int once, then marks it dynamic: sample 0's length changes at the 2nd call, sample
    # 1's at the 3rd; from then on nothing recompiles (no treadfx guard, int() or hash pins a caption length)
    assert graphs[2] > graphs[1] > graphs[0] and graphs[3] == graphs[2]
    # no guard has failed yet: exactly diffusers' mask .tolist() and the variant dispatch (a
    # torch.compiler.disable'd frame), nothing inside the routed program
    assert {k.split("\n")[0] for k in counters["graph_break"]} == {
        "Data dependent operator", "Skip inlining `torch.compiler.disable()`d function"}
    traced = treadfx.tracing.traces_run()
    # a new padded length (7), then captions of one length (no mask): each a new variant, traced eagerly once (the
    # compiled model switches to it); back to the first variant, then to the other two again.  dynamo's automatic
    # dynamic shapes generalise a frame the variants share once it has seen two of them; after that, switching
    # among the variants traces and compiles nothing
    for k, lengths in enumerate(([3, 7], [6, 6], [5, 8], [3, 7], [6, 6])):
        step(lengths, backward=k < 2)  # the new variants' backward; the repeats check the forward switch
    assert treadfx.tracing.traces_run() - traced == 2  # [3, 7] and [6, 6]; the rest reuse a cached variant
    assert [len(v) for v in state_of(tm).programs.values()] == [3]
    for lengths in ([5, 8], [3, 7], [6, 6]):
        step(lengths, backward=False)
    assert graphs[-1] == graphs[-4], graphs
    assert treadfx.tracing.traces_run() - traced == 2
    breaks = {k.split("\n")[0] for k in counters["graph_break"]}
    # and a failing guard's raise: dynamo does not trace the construction of ValueGuardFailure (the exception is
    # raised eagerly) and then compiles its __init__ as a frame of its own, where it stops at the message's repr
    # of a dynamic int or, while the ints are still static, at the super().__init__ call (which of the two first
    # depends on dynamo's automatic-dynamic state: aot_eager saw only the repr, eager both)
    assert breaks <= {"Data dependent operator", "Skip inlining `torch.compiler.disable()`d function",
                      "repr_impl not implemented",
                      "Attempted to call a super() attribute that is not a function or method"}, breaks


def test_aot_eager_routed_forward_and_backward_equal_eager(fresh_dynamo):
    """torch.compile with aot_eager (AOT autograd traces the forward and the backward) of the routed Lumina2:
    output and every parameter gradient equal the eager routed model's on the kept indices the compiled step drew,
    with the joint mask and rotary rows gathered at per-sample offsets."""
    tm = treadfx.transform(tiny_lumina2(layers=3), start=1, end=1, ratio=0.5)
    args = tiny_lumina2_inputs([5, 8], torch.Generator().manual_seed(5))
    out = torch.compile(tm, backend="aot_eager")(*args).sample
    kept = [rec.kept for rec in treadfx.last_routes(tm)]
    assert [k.shape for k in kept] == [(2, N // 2)]
    with treadfx.fixed_routes(tm, kept):
        eager = tm(*args).sample
    assert torch.equal(out, eager)
    params = [p for p in tm.parameters() if p.requires_grad]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    got = torch.autograd.grad((out * w).sum(), params, allow_unused=True)
    want = torch.autograd.grad((eager * w).sum(), params, allow_unused=True)
    assert sum(a is not None for a in want) > len(params) // 2
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_padded_length_note_names_the_line_and_advice_a_library_user_can_follow():
    """The padded length (``max(seq_lengths)``, a shape) is specialised with a guard: the one-time note names the
    diffusers line and, since a user cannot move diffusers' code into a submodule, says to pad to a few lengths."""
    tm = treadfx.transform(tiny_lumina2(layers=3), start=1, end=1, ratio=0.5)
    with pytest.warns(UserWarning) as record:
        tm(*tiny_lumina2_inputs([5, 8], torch.Generator().manual_seed(0)))
    notes = [str(w.message) for w in record if "max_seq_len" in str(w.message)]
    assert len(notes) == 1 and "transformer_lumina2.py" in notes[0]
    assert "pad to a few fixed lengths" in notes[0] and "re-checks it at every call" in notes[0]
