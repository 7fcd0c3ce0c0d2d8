"""Why a block cannot run on the kept tokens, and which input is the problem.

When the fake probes of :func:`treadfx.planning.settle_side_inputs` find a node of a route's region that no
gathering of its inputs gets past, :func:`raise_unroutable` raises the :class:`UnroutableRegionError`.  Its message
names the block (or operation), the operation inside it that failed where the error shows it, and the input that
is the problem, found by more fake runs of the region, each changing the treatment of one kind of input:

* a table that lines up with the image tokens but has no batch dimension, under ``selection='per_sample'`` or
  ``'structured'``: the block runs when that table is gathered once for the whole batch -> ``selection='shared'``;
* a per-token input whose token axis is merged with another one (``[B, N*D]``, reshaped inside the block): the
  block runs when that axis holds the kept tokens times the other size -> pass it as ``[B, N, D]``;
* a block's own parameter or buffer with a token-sized axis (a ``[N, D]`` position table inside the block): the
  block runs with that axis cut to the kept count -> pass it as an input to the block, or end the route there;
* otherwise the inputs that line up with the tokens (or have a token-sized axis) but do not help, as evidence.

Only a diagnosis: nothing here changes what a route gathers.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from typing import Any, NoReturn

import torch
import torch.fx as fx

from .errors import UnroutableRegionError
from .fake_eval import fake_like, no_user_hooks, quiet_fake_tensor_logs
from .layout import TokenInfo, block_joint_layouts, layout_str, token_sized_axes
from .planning import (RouteScope, ValueDecision, _inputs_of, _known_layouts, _node_label, _node_value, _shape,
                       _shrunk, _shrunk_parts, _side_decisions)

__all__ = ["raise_unroutable", "Problem", "find_problem", "failing_operation", "batch_axes_elsewhere"]


@dataclasses.dataclass
class Problem:
    """The diagnosis: ``text`` continues "cannot run on the kept tokens ..." (it starts with "; the problem is"),
    ``fix`` is the advice for this case (None: the generic advice)."""

    text: str
    fix: str | None = None


def raise_unroutable(r: RouteScope, entering: dict, env: dict, failed: fx.Node, err: Exception, prober,
                     n_img: int) -> NoReturn:
    """Raise the UnroutableRegionError for ``failed`` (the region's node no gathering gets past): it names the
    node, the failing operation inside it where known, the input that is the problem with the reason when a fake
    run can show it, every input's shape, the error, and a fix that fits the case."""

    def shape(i: fx.Node) -> list[int]:
        return list(_shape(env.get(i, entering[i].node.meta.get("val") if i in entering else i.meta.get("val"))))

    shapes = ", ".join(f"{r.name_of(i)}={shape(i)}" for i in _inputs_of(failed))
    try:
        problem = find_problem(r, entering, failed, prober, n_img)
    except Exception:  # noqa: BLE001 - the diagnosis is best effort; the refusal itself must not fail
        problem = Problem("")
    op = failing_operation(err) if failed.op == "call_module" else None
    where = f" (in {op})" if op else ""
    fix = problem.fix or ("end the route before this operation, or make the tensor it needs token-aligned; "
                          "treadfx never routes a region it cannot prove shape-consistent")
    raise UnroutableRegionError(
        f"route {r.index} (chain blocks {r.start}..{r.end}): {_node_label(r.prog, failed)} cannot run on the kept "
        f"tokens ({prober.probe_k} of {n_img} in the probe){problem.text}. Inputs: {shapes}. Error{where}: "
        f"{type(err).__name__}: {err}. Fix: {fix}."
    )


def failing_operation(err: BaseException) -> str | None:
    """The torch operation that raised ``err`` inside a module, as "`add` at file.py:12: `code`" (the op from
    the fake-tensor dispatch, the place from the innermost frame outside torch and treadfx), or None."""
    op = None
    tb = err.__traceback__
    while tb is not None:  # outermost dispatch first: the op the model called, not a decomposition of it
        func = tb.tb_frame.f_locals.get("func")
        if op is None and isinstance(func, torch._ops.OpOverload):
            op = func.overloadpacket.__name__.rstrip("_") or None
        tb = tb.tb_next
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    place = None
    for fr in traceback.extract_tb(err.__traceback__):
        if not (fr.filename.startswith(torch_dir) or fr.filename.startswith(here)):
            place = fr
    if op is None and place is None:
        return None
    text = f"`{op}`" if op else "an operation"
    if place is not None:
        code = f": `{place.line.strip()}`" if place.line else ""
        text += f" at {os.path.basename(place.filename)}:{place.lineno}{code}"
    return text


def find_problem(r: RouteScope, entering: dict, failed: fx.Node, prober, n_img: int) -> Problem:
    """Which input of ``failed`` keeps it from running on the kept tokens, and why (see the module docstring)."""
    gm = r.prog.gm
    known = [lay for lay in _known_layouts(gm, r.analysis) if sum(s.length for s in lay if s.kind == "image") == n_img]
    known += [lay for lay in block_joint_layouts(gm, r.analysis, failed, n_img, lambda n: _node_value(gm, n))
              if lay not in known]
    readings: dict[fx.Node, ValueDecision] = {}
    for i in _inputs_of(failed):
        d = entering.get(i)
        if d is not None and d.action == "pass":
            found = _side_decisions(r, i, failed, n_img, known)
            if found:
                readings[i] = found[0]
    base = dict(entering)
    base.update({i: dataclasses.replace(c) for i, c in readings.items()})
    pos = r.region.index(failed)

    def passes(shared=frozenset(), extra=None) -> bool:
        try:
            gathered = _gathered(prober, base, shared)
            gathered.update(extra or {})
            _, f2, _ = prober.walk.run(gathered, until=failed)
        except Exception:  # noqa: BLE001 - a probe that cannot even be set up shows nothing
            return False
        return f2 is None or r.region.index(f2) > pos

    # 1. tables without a batch dimension under per-sample selection
    shared: frozenset = frozenset()
    if prober.per_sample_unbatched:
        unb = [i for i in _inputs_of(failed) if i in base and base[i].action == "gather" and not base[i].batched]
        if unb and passes(frozenset(unb)):
            needed = [i for i in unb if not passes(frozenset(unb) - {i})] or unb
            return _unbatched_problem(r, prober, base, needed, failed)
        shared = frozenset(unb)

    # 2. per-token inputs whose token axis is merged with another one
    mode = r.prog.evaluator.mode
    for i in _inputs_of(failed):
        d = base.get(i)
        v = _node_value(gm, i)
        if d is None or d.action != "pass" or not isinstance(v, torch.Tensor):
            continue
        batched = r.analysis.is_batched_value(i, v)
        for axis in range(1 if batched else 0, v.ndim):
            size = int(v.shape[axis])
            if size <= n_img or size % n_img:
                continue
            m = size // n_img
            new = list(v.shape)
            new[axis] = prober.probe_k * m
            if passes(shared, {i: fake_like(v, mode, tuple(new))}):
                lead = ", ".join(["B"] if batched else []) + (", " if batched else "")
                return Problem(
                    f"; the problem is {r.name_of(i)} {list(v.shape)}: its axis {axis} holds the {n_img} tokens "
                    f"merged with another axis ({n_img} x {m}), so it cannot be gathered (the block runs when that "
                    f"axis holds the kept tokens: {prober.probe_k} x {m})",
                    f"pass it as [{lead}N, D] ({r.name_of(i)} with the token axis on its own, here "
                    f"[{', '.join(str(s) for s in v.shape[:axis])}{', ' if axis else ''}{n_img}, {m}]) so treadfx "
                    "can gather it, and reshape after the gather inside the block; or end the route before this block")

    # 3. the block's own parameters and buffers with a token-sized axis
    if failed.op == "call_module":
        own = _own_token_tables(r, prober, base, shared, failed, n_img)
        if own:
            block = r.prog.model_path(failed)
            names = " and ".join(f"`{block}.{path}` {list(t.shape)}" for path, t, kind in own)
            kind = own[0][2] if len({k for _, _, k in own}) == 1 else "parameter"
            one = len(own) == 1
            return Problem(
                f"; the problem is the block's own {kind}{'' if one else 's'} {names}: "
                f"{'it is a per-token table' if one else 'per-token tables'} inside the block (the block runs when "
                f"{'its' if one else 'their'} token axis is cut to the kept tokens): treadfx cannot gather "
                f"{'it' if one else 'them'}",
                f"pass {'it' if one else 'them'} as an input to the block (treadfx then gathers "
                f"{'it' if one else 'them'} with the kept tokens) or end the route before this block")

    # 4. evidence only: inputs that line up but do not help, or token-sized axes treadfx cannot line up
    return _evidence(r, base, readings, failed, n_img)


def _gathered(prober, decisions: dict, shared: frozenset) -> dict:
    """The probe's gathered values (as :meth:`treadfx.planning.Prober.run` builds them) for ``decisions``, with
    the tables in ``shared`` gathered once for the whole batch."""
    r = prober.r
    gm, mode = r.prog.gm, r.prog.evaluator.mode
    out = {}
    for n, d in decisions.items():
        if d.action != "gather":
            continue
        per_sample = prober.per_sample_unbatched and n not in shared
        if d.parts is not None:
            out[n] = _shrunk_parts(_node_value(gm, n), d, prober.probe_k, per_sample, prober.batch, mode)
        else:
            out[n] = _shrunk(n.meta["val"], TokenInfo(d.axis, d.layout, d.batched), prober.probe_k, per_sample,
                             prober.batch, mode)
    return out


def _unbatched_problem(r: RouteScope, prober, base: dict, needed: list, failed: fx.Node) -> Problem:
    per = _gathered(prober, {i: base[i] for i in needed}, frozenset())
    one = _gathered(prober, {i: base[i] for i in needed}, frozenset(needed))
    named = [f"{r.name_of(i)} (shape {list(_shape(_node_value(r.prog.gm, i)))})" for i in needed]
    lays = [f" ({layout_str(base[i].layout)} on axis {base[i].axis})" if base[i].layout is not None else ""
            for i in needed]
    if len(needed) == 1:
        it, names = "it", f"{named[0]}: it lines up with the image tokens{lays[0]}"
    elif len(set(lays)) == 1:
        it, names = "them", f"{' and '.join(named)}: they line up with the image tokens{lays[0]}"
    else:
        it, names = "them", "; and ".join(f"{n}: it lines up with the image tokens{la}" for n, la in zip(named, lays))
    shapes = "; ".join(dict.fromkeys(f"{list(_shape(per[i]))} where the block runs with {list(_shape(one[i]))}"
                                     for i in needed if isinstance(per.get(i), torch.Tensor)))
    shown = f" (in the probe: {shapes})" if shapes else ""
    sel = r.route.selection
    return Problem(
        f"; the problem is {names}, but {_node_label(r.prog, failed)} fails with {it} gathered too: treadfx sees "
        f"no batch dimension in {it} (not derived from the image input's batch), so with selection='{sel}' each "
        f"sample gets a copy with its own kept rows in front of its shape{shown}, which the block cannot use; "
        "gathered once for the whole batch, the block runs",
        "Use selection='shared' (one kept subset for the whole batch), or build the table from the image input's "
        "batch")


def _own_token_tables(r: RouteScope, prober, base: dict, shared: frozenset, failed: fx.Node, n_img: int) -> list:
    """(path, tensor, "parameter" | "buffer") of ``failed``'s own tensors with a token-sized axis whose cut to
    the kept count lets the module run in the probe (a Linear's weight of a coincidental size does not)."""
    module = r.prog.gm.get_submodule(failed.target)
    tensors = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    sizes = {n_img}
    cands = []
    for path, t in list(tensors.items()) + list(buffers.items()):
        hits = [a for a in range(t.ndim) if int(t.shape[a]) in sizes]
        if hits:
            cands.append((path, t, "buffer" if path in buffers and path not in tensors else "parameter", hits))
    if not cands:
        return []
    cands = cands[:8]  # each is one fake run of the block
    gathered = _gathered(prober, base, shared)
    env, f2, _ = prober.walk.run(gathered, until=failed)
    if f2 is not failed:
        return []
    gm, ev = r.prog.gm, r.prog.evaluator

    def value(n: fx.Node) -> Any:
        return env[n] if n in env else gathered[n] if n in gathered else _node_value(gm, n)

    args, kwargs = fx.node.map_arg((failed.args, failed.kwargs), value)

    def runs(swap: dict) -> bool:
        try:
            a, k = ev.fakeify((args, kwargs))
            with quiet_fake_tensor_logs(), no_user_hooks(), ev.mode:
                torch.func.functional_call(module, swap, a, k)
            return True
        except Exception:  # noqa: BLE001 - it still fails: not (only) this table
            return False

    def cut(t: torch.Tensor, axes) -> torch.Tensor:
        shape = [prober.probe_k if a in axes else int(s) for a, s in enumerate(t.shape)]
        return fake_like(t, ev.mode, tuple(shape))

    found = [(p, t, kind) for p, t, kind, axes in cands if runs({p: cut(t, axes)})]
    if not found and len(cands) > 1 and runs({p: cut(t, axes) for p, t, _, axes in cands}):
        found = [(p, t, kind) for p, t, kind, _ in cands]
    return found


def _evidence(r: RouteScope, base: dict, readings: dict, failed: fx.Node, n_img: int) -> Problem:
    """"; the problem is X ..." for an input that lines up with the tokens but does not help when gathered, or
    one with a token-sized axis treadfx cannot line up with the image tokens (the advice stays generic)."""
    others = list(range(1, 9))
    for i in _inputs_of(failed):
        info = r.analysis.token_info(i)
        if isinstance(info, TokenInfo):
            others += [s.length for s in info.layout if s.kind != "image"]
    found = []
    for i in _inputs_of(failed):
        v = _node_value(r.prog.gm, i)
        c = readings.get(i)
        if c is not None:
            return Problem(f"; the problem is {r.name_of(i)} (shape {list(_shape(v))}): it lines up with the image "
                           f"tokens ({layout_str(c.layout)} on axis {c.axis}), but {_node_label(r.prog, failed)} "
                           "fails with it gathered too")
        d = base.get(i)
        if d is None or d.action != "pass":
            continue
        batched = isinstance(v, torch.Tensor) and r.analysis.is_batched_value(i, v)
        axes = token_sized_axes(v, n_img, others, batched)
        if axes:
            where = ", ".join(f"{p + ' ' if p else ''}axis {a} ({size} positions)" for p, a, size in axes[:3])
            found.append(f"{r.name_of(i)} (shape {list(_shape(v))}; {where})")
    if not found:
        return Problem("")
    return Problem(f"; the problem is {' and '.join(found)}: its token-sized axis could not be lined up with the "
                   f"{n_img} image tokens, so treadfx cannot gather it with the kept ones (an axis that is the image "
                   "tokens plus others needs a layout treadfx can see, e.g. built by a cat of an image-sized and "
                   "other pieces, or a block that joins image and text tokens inside)")



def batch_axes_elsewhere(analysis, unbatched: list, name_of) -> str | None:
    """Why a route falls back to shared selection when a gathered table does have the batch, only not on axis 0
    (``[N, B, D]`` modulation): "`x` has its batch axis on axis 1, not axis 0 ...", or None when no such table is
    among ``unbatched`` (each gathered ValueDecision without a batch dimension on axis 0).  A table counts as
    batched elsewhere when it is a batched value moved by one-input operations (transpose, permute, contiguous)
    and an axis other than 0 and its token axes has the image input's batch size (> 1)."""
    batch = getattr(analysis, "batch", None)
    if not batch or batch < 2:
        return None
    moved, plain = [], []
    for d in unbatched:
        node, val = d.node, getattr(d.node, "meta", {}).get("val")
        token_axes = {a for p in (d.parts or ()) for a, _ in p.axes} | {d.axis}
        axis = None
        if isinstance(val, torch.Tensor) and _from_batched(analysis, node):
            axis = next((a for a in range(1, val.ndim) if a not in token_axes and int(val.shape[a]) == batch), None)
        (moved if axis is not None else plain).append((d, axis, val))
    if not moved:
        return None
    text = "; ".join(f"{name_of(d.node)} {list(val.shape)} has its batch axis on axis {axis}, not axis 0"
                     for d, axis, val in moved)
    if plain:
        text += "; " + ", ".join(name_of(d.node) for d, _, _ in plain) + " has no batch dimension"
    return (f"{text}: treadfx gives each sample its own subset only with tables batched on axis 0, so one subset "
            "serves the whole batch (move the batch axis to the front for per-sample selection)")


def _from_batched(analysis, node: fx.Node, steps: int = 8) -> bool:
    """True if ``node`` is a batched value (batch on axis 0) moved by a few one-input operations."""
    for _ in range(steps):
        ins = node.all_input_nodes
        if len(ins) != 1:
            return False
        node = ins[0]
        if analysis.batched.get(node) is True:
            return True
    return False
