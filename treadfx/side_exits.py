"""Values that leave a route sideways: computed inside a route, used after it, other than the token stream.

Example: REPA's model returns ``projector(output of block encoder_depth-1)``; when that block lies inside a
route, only the kept tokens' rows of the block's output were computed by the routed blocks in this call.  By
default (``side_exits="full"``) the pass scatters such a value back to all tokens, like the stream: the skipped
tokens' rows are filled from the stream at route-out, i.e. they are *stale* (the output of block ``start-1``).
That is exact TREAD semantics for a value that only re-enters later blocks (U-ViT's long skips), but a loss on a
model output built from it would silently mix fresh and stale rows.  So:

* :func:`route_mask` tells which rows of such a value (or of a model output computed from it) are fresh in the
  last routed call: bool ``[B, T]`` over its token axis, True where the routed blocks computed the row (kept
  image tokens and never-routed extra tokens), all True after an unrouted call;
* ``transform(..., side_exits="kept")`` returns such outputs with the kept rows only (``[B, T_kept, ...]``, in
  the order of the route's kept indices; :func:`route_rows` gives each row's token position), so nothing stale
  is computed at all;
* ``inspect`` lists every side exit with its producer, token axis, what fills its skipped rows and where it goes;
* the first training call warns once (:class:`SideExitWarning`) for each side exit that reaches a model output,
  naming the output and the fix, unless ``side_exits`` was passed explicitly to ``transform``.

Side exits read only by chain blocks after the route (U-ViT long skips) never warn: that is TREAD itself.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from typing import Any, Sequence

import torch
import torch.fx as fx

from .errors import TransformError
from .graph_walk import downstream, upstream
from .layout import Layout, image_span, layout_str

__all__ = ["SideExit", "ExitOutput", "SideExitWarning", "SideExitError", "SIDE_EXIT_MODES", "find_side_exits",
           "route_mask", "route_rows", "warn_side_exits", "check_side_exits_mode", "apply_kept_exits",
           "kept_output_positions"]

#: accepted values of ``transform(side_exits=...)``; None is "full" with a warning on the first training call
SIDE_EXIT_MODES = ("full", "kept")


class SideExitWarning(UserWarning):
    """A model output is computed from a value produced inside a route: its skipped tokens' rows are stale."""


class SideExitError(TransformError, ValueError):
    """A side exit cannot be found or cannot be given as asked (kept rows only, a mask on an unknown axis)."""


def check_side_exits_mode(mode: Any) -> str | None:
    """``mode`` if it is None, "full" or "kept"; else :class:`SideExitError` naming the choices."""
    if mode is None or mode in SIDE_EXIT_MODES:
        return mode
    raise SideExitError(
        f"side_exits={mode!r} is not a known mode. Fix: side_exits='full' (values leaving a route sideways keep "
        "every token row, skipped rows filled from the stream at route-out; mask them with treadfx.route_mask) or "
        "side_exits='kept' (model outputs computed from them keep only the kept rows)."
    )


@dataclasses.dataclass
class ExitOutput:
    """A model output computed from a side exit (through no chain block): its position among the forward's tensor
    outputs, its readable path (``output[1][0]``) and its token axis (None when it could not be identified)."""

    position: int
    path: str
    axis: int | None


@dataclasses.dataclass
class SideExit:
    """One value produced inside route ``route`` and used after it other than by the token stream's continuation.

    ``producer`` is the module path (``blocks.3``) or graph node that computes it, ``axis``/``layout`` its token
    axis and layout, ``fill`` what its skipped tokens' rows hold after the route, ``outputs`` the model outputs
    computed from it without passing through another chain block, ``consumers`` the chain blocks after the route
    that read it (a long skip), ``mode`` "full" (scattered back to every token) or "kept" (kept rows only).
    """

    route: int
    node: fx.Node = dataclasses.field(repr=False, compare=False)
    producer: str
    name: str
    axis: int
    layout: Layout
    fill: str
    mode: str
    outputs: list[ExitOutput]
    consumers: list[str]
    stream: bool = False
    side_users: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    @property
    def length(self) -> int:
        """Tokens along its token axis without routing (image tokens plus extra ones)."""
        return sum(s.length for s in self.layout)

    @property
    def reaches_output(self) -> bool:
        return bool(self.outputs)

    def describe(self) -> str:
        """One line for ``inspect``."""
        where = []
        if self.outputs:
            outs = ", ".join(f"{o.path} (token axis {o.axis if o.axis is not None else 'unknown'})"
                             for o in self.outputs)
            where.append(f"returned as {outs}: " + (
                "kept rows only" if self.mode == "kept" else
                "fresh and stale rows mixed; average a loss on it with treadfx.route_mask"))
        if self.stream:
            where.append(f"continues as the token stream into `{self.consumers[0]}`")
        elif self.consumers:
            where.append("read by chain block(s) " + ", ".join(f"`{c}`" for c in self.consumers)
                         + " after the route (a long skip: exact TREAD semantics)")
        if not where:
            where.append("used after the route by non-block code only")
        return (f"route {self.route}: {self.name} (producer `{self.producer}`, node {self.node.name}) "
                f"{layout_str(self.layout)} on axis "
                f"{self.axis}; skipped rows: {self.fill}; " + "; ".join(where))

    def to_dict(self) -> dict:
        return {"route": self.route, "producer": self.producer, "name": self.name, "axis": self.axis,
                "layout": layout_str(self.layout), "fill": self.fill, "mode": self.mode,
                "outputs": [dataclasses.asdict(o) for o in self.outputs], "consumers": list(self.consumers),
                "stream": self.stream}

    # ------------------------------------------------------------------------------------ masks and rows
    def _full_positions(self, kept: torch.Tensor, batch: int) -> torch.Tensor:
        """[B, T_kept] positions on the full token axis of the rows a route keeps (extra tokens included)."""
        off, n = image_span(self.layout)
        kept = kept.unsqueeze(0).expand(batch, -1) if kept.ndim == 1 else kept
        lead = torch.arange(off, device=kept.device).expand(kept.shape[0], off)
        tail = torch.arange(off + n, self.length, device=kept.device).expand(kept.shape[0], self.length - off - n)
        return torch.cat([lead, kept + off, tail], dim=1)

    def mask(self, kept: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Bool mask of fresh rows as this side exit is delivered (``[B, T]`` full, ``[B, T_kept]`` kept)."""
        device = kept.device if kept is not None else None
        if kept is None:
            return torch.ones(batch, self.length, dtype=torch.bool, device=device)
        pos = self._full_positions(kept, batch)
        if self.mode == "kept":
            return torch.ones(pos.shape, dtype=torch.bool, device=device)
        mask = torch.zeros(pos.shape[0], self.length, dtype=torch.bool, device=device)
        return mask.scatter(1, pos, True)

    def rows(self, kept: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Int64 ``[B, T']``: for each row as delivered, its token position on the full token axis."""
        if kept is None or self.mode == "full":
            device = kept.device if kept is not None else None
            return torch.arange(self.length, device=device).expand(batch, self.length)
        return self._full_positions(kept, batch)


# ------------------------------------------------------------------------------------------ planning


def _output_paths(prog) -> list[str]:
    """Readable path of each tensor output of the traced forward (``output``, ``output[1][0]``, ``output.sample``)."""
    from .outputs import leaf_accessors

    try:
        access = leaf_accessors(prog.out_spec)
    except Exception:  # noqa: BLE001 - an unusual spec only loses the readable names
        access = []
    paths = []
    for k, pos in enumerate(prog.out_tensor_positions):
        steps = access[pos] if pos < len(access) else [("item", k)]
        paths.append("output" + "".join(f"[{key!r}]" if kind == "item" else f".{key}" for kind, key in steps))
    return paths


def _output_axis(out: fx.Node, exit_val: torch.Tensor, exit_axis: int, n_img: int, analysis) -> int | None:
    """The token axis of a model output computed from a side exit: from the layout analysis when it tracked the
    exit's image tokens there, else the one axis (the exit's own axis preferred) of the exit's token length."""
    val = out.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.ndim < 2 or val.shape[0] != exit_val.shape[0]:
        return None
    info = analysis.token_info(out) if analysis is not None else None
    if info is not None and getattr(info, "has_image", lambda: False)() and info.axis >= 1 \
            and val.shape[info.axis] == exit_val.shape[exit_axis]:
        try:
            if image_span(info.layout)[1] == n_img:
                return info.axis
        except Exception:  # noqa: BLE001 - several image segments: fall back to sizes
            pass
    length = exit_val.shape[exit_axis]
    axes = [a for a in range(1, val.ndim) if val.shape[a] == length]
    if exit_axis in axes:
        return exit_axis
    return axes[0] if len(axes) == 1 else None


def find_side_exits(prog, analysis, chain_nodes: Sequence[fx.Node], index: int, region: Sequence[fx.Node],
                    leaving: list, stream: fx.Node, name_of, mode: str | None) -> list[SideExit]:
    """The side exits of route ``index`` among its ``leaving`` decisions, on the graph before the pass rewrites it.

    A side exit is a scattered value other than the stream, or the stream itself when it also reaches a model output
    through no chain block while a later chain block continues it (REPA's features of the route's last block).  The
    stream of a route that ends at the last block is the model's output, not a side exit.  Decisions of side exits
    that reach an output are relabelled ("side exit"); with ``mode="kept"`` :func:`apply_kept_exits` later gives
    their output path the kept rows only.
    """
    gm = prog.gm
    chain_set, rset = set(chain_nodes), set(region)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    paths = _output_paths(prog)
    not_block = lambda n: n not in chain_set  # noqa: E731 - a walk stops at chain blocks
    reach = [set(upstream([o], expand=not_block)) if isinstance(o, fx.Node) else set() for o in outs]
    exits = []
    for d in leaving:
        if d.action != "scatter":
            continue
        node = d.node
        is_stream = d.role == "token stream"
        val = node.meta.get("val")
        _, n_img = image_span(d.layout)
        outputs = [ExitOutput(k, paths[k] if k < len(paths) else f"output {k}",
                              _output_axis(o, val, d.axis, n_img, analysis))
                   for k, o in enumerate(outs) if node in reach[k]]
        after = [u for u in node.users if u not in rset]
        consumers = [prog.model_path(n) for n in downstream(after, expand=not_block)
                     if n in chain_set and n not in rset]
        if is_stream and consumers:
            # an output that also depends on a later chain block is the stream going on (``h = h + block(h)``
            # outside the blocks reaches the output through the residual adds), not a side path from the route
            later = {n for n in downstream([node]) if n in chain_set and n not in rset}
            outputs = [e for e, o in zip(outputs, [o for k, o in enumerate(outs) if node in reach[k]])
                       if not any(n in later for n in upstream([o]))]
        if is_stream and not (outputs and consumers):
            continue  # the stream going on (or the model's output): TREAD itself
        side_users = [u for u in after if u not in chain_set
                      and not any(n in chain_set for n in downstream([u], expand=not_block))]
        kept = mode == "kept" and bool(outputs) and bool(side_users)
        producer = _producer(prog, node)
        fill = ("nothing: kept rows only on the way to the output (side_exits='kept')" if kept else
                f"the stream at route-out ({name_of(stream)})")
        if outputs and not is_stream:
            d.role = "side exit (kept rows)" if kept else "side exit"
            d.reason = ("side_exits='kept': the outputs computed from it get only the route's kept rows" if kept else
                        "reaches a model output; its skipped rows are restored from the stream at route-out, so "
                        "they are stale for this value: mask them with treadfx.route_mask")
        exits.append(SideExit(index, node, producer, name_of(node), d.axis, d.layout, fill,
                              "kept" if kept else "full", outputs, consumers, is_stream, side_users))
    return exits


def apply_kept_exits(gm: fx.GraphModule, plans: Sequence, traced=None, selects: Sequence = ()) -> None:
    """After the TREAD pass: the code between each kept-mode side exit and the outputs it reaches reads the kept rows
    (the value before its scatter) instead of the scattered value; a scatter left unused is removed.  With
    ``traced``/``selects`` the rewritten graph is then fake-run with the routes active: code that cannot run on the
    kept rows, or an output whose token axis does not come out with the kept count, raises :class:`SideExitError`
    naming the side exit and the fix."""
    kept_exits = [e for plan in plans for e in getattr(plan, "side_exits", []) if e.mode == "kept"]
    if not kept_exits:
        return
    for e in kept_exits:
        scatters = [u for u in e.node.users if "treadfx" in u.meta and u.meta["treadfx"][0] == "scatter"]
        for s in scatters:
            for u in e.side_users:
                u.replace_input_with(s, e.node)
            if not s.users:
                gm.graph.erase_node(s)
    gm.graph.lint()
    gm.recompile()
    if traced is not None:
        _check_kept(gm, kept_exits, plans, traced, selects)


def _check_kept(gm, kept_exits, plans, traced, selects) -> None:
    saved = [(sel.forced, sel.fixed) for sel in selects]
    names = "; ".join(f"{e.name} -> {', '.join(o.path for o in e.outputs)}" for e in kept_exits)
    try:
        for sel in selects:
            sel.forced, sel.fixed = True, None
        env = traced.evaluator.propagate(gm, list(traced.fake_inputs or []))
    except Exception as err:  # noqa: BLE001 - reported with the side exits
        raise SideExitError(
            f"side_exits='kept': the code between the side exit(s) ({names}) and the model outputs cannot run on the "
            f"kept rows only ({type(err).__name__}: {err}): an operation there needs every token (a reshape to a "
            "fixed number of tokens, or a mix with a full-length tensor). Fix: side_exits='full' and average the "
            "loss over fresh rows with treadfx.route_mask(model, value), or write the reshape with -1."
        ) from err
    finally:
        for sel, (f, x) in zip(selects, saved):
            sel.forced, sel.fixed = f, x
    output = next(n for n in gm.graph.nodes if n.op == "output")
    keep = {plan.index: sel.num_keep for plan, sel in zip(plans, selects)}
    for e in kept_exits:
        _, n = image_span(e.layout)
        for o in e.outputs:
            node = output.args[0][o.position]
            got, orig = env.get(node), node.meta.get("val")
            if o.axis is None:
                raise SideExitError(
                    f"side_exits='kept': {o.path} is computed from {e.name} inside route {e.route}, but treadfx "
                    f"cannot tell which of its axes holds the {e.length} tokens. Fix: keep the token axis of the "
                    "value as it is (no flattening into the batch), or use side_exits='full' with treadfx.route_mask."
                )
            want = list(orig.shape)
            want[o.axis] = want[o.axis] - n + min(keep.get(e.route, n), n)
            if not isinstance(got, torch.Tensor) or list(got.shape) != want:
                shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise SideExitError(
                    f"side_exits='kept': {o.path} (computed from {e.name}) has shape {shape} on the kept rows where "
                    f"{want} was expected: the code between `{e.producer}` and this output does not keep the token "
                    "count (e.g. a reshape to a fixed number of tokens). Fix: reshape with -1 or the value's own "
                    "shape, or use side_exits='full' with treadfx.route_mask."
                )


def kept_output_positions(plans: Sequence) -> set[int]:
    """Output positions that a kept-mode side exit shortens (their shape differs from the original on purpose)."""
    return {o.position for plan in plans for e in getattr(plan, "side_exits", []) if e.mode == "kept"
            for o in e.outputs}


def _producer(prog, node: fx.Node) -> str:
    if node.op == "call_module":
        return prog.model_path(node)
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem" \
            and isinstance(node.args[0], fx.Node):
        return f"{_producer(prog, node.args[0])}[{node.args[1]}]"
    return node.name


# ------------------------------------------------------------------------------------------ runtime


def side_exits_of(routed) -> list[SideExit]:
    """Every side exit of a routed program, in route order."""
    return [e for plan in routed.plans for e in getattr(plan, "side_exits", [])]


def warn_side_exits(st, routed, model_name: str) -> None:
    """Warn once per model and side exit that reaches a model output (full mode, ``side_exits`` not given)."""
    if getattr(st.config, "side_exits", None) is not None:
        return
    for e in side_exits_of(routed):
        if e.mode != "full" or not e.outputs:
            continue
        key = ("side_exit", e.producer, tuple(o.path for o in e.outputs))
        if key in st.warned:
            continue
        st.warned.add(key)
        plan = routed.plans[e.route]
        outs = ", ".join(o.path for o in e.outputs)
        warnings.warn(
            f"treadfx: {outs} of {model_name} is computed from {e.name}, produced inside route {e.route} (chain "
            f"blocks {plan.start}..{plan.end}). In routed training only the kept tokens' rows of it are computed "
            f"by the routed blocks; the skipped tokens' rows hold {e.fill}, stale for this value. "
            f"Fix: average a loss "
            f"on it over fresh rows with mask = treadfx.route_mask(model, value) (bool [B, T], True = fresh), or "
            "transform(..., side_exits='kept') for kept rows only, or end the route before "
            f"`{e.producer}`. Pass side_exits='full' to transform to silence this warning.",
            SideExitWarning, stacklevel=5,  # the user's model(...) call
        )


def record_outputs(user: Sequence[Any]) -> tuple:
    """Weak references to the tensors a routed call returned (to find a side exit by the tensor object)."""
    if torch.compiler.is_compiling():
        return ()
    return tuple(weakref.ref(t) if isinstance(t, torch.Tensor) else None for t in user)


def _select(exits: list[SideExit], value: torch.Tensor | None, producer: str | None,
            refs: tuple) -> tuple[SideExit, ExitOutput | None]:
    """The side exit (and the output) meant by ``value`` / ``producer``."""
    listing = "; ".join(f"`{e.producer}` -> " + (", ".join(o.path for o in e.outputs) or "no output")
                        for e in exits) or "none"
    if producer is not None:
        for e in exits:
            if producer in (e.producer, e.name, e.node.name):
                out = None
                if value is not None:
                    out = next((o for o in e.outputs if o.position < len(refs) and refs[o.position] is not None
                                and refs[o.position]() is value), None)
                return e, out if out is not None else (e.outputs[0] if len(e.outputs) == 1 else None)
            for o in e.outputs:
                if producer == o.path:
                    return e, o
        raise SideExitError(f"route_mask: no side exit is produced by {producer!r} in the last routed call; its side "
                            f"exits are: {listing}. Fix: name one of these producers or output paths.")
    if value is not None:
        if not isinstance(value, torch.Tensor):
            raise SideExitError(f"route_mask: value must be a tensor returned by the model, got "
                                f"{type(value).__name__}. Fix: pass the returned tensor, or producer='<module path>'.")
        for e in exits:
            for o in e.outputs:
                if o.position < len(refs) and refs[o.position] is not None and refs[o.position]() is value:
                    return e, o
        raise SideExitError(
            "route_mask: this tensor is not a side exit the last routed call returned (a copy, a slice, a tensor of "
            "another call, or a call under torch.compile, where treadfx does not keep the returned objects). "
            f"Side exits of that call: {listing}. Fix: pass the tensor exactly as the model returned it, or name "
            "it with producer='<module path>' (or the output path).")
    reaching = [e for e in exits if e.outputs] or exits
    if len(reaching) == 1:
        e = reaching[0]
        return e, e.outputs[0] if len(e.outputs) == 1 else None
    raise SideExitError(f"route_mask: the last routed call has {len(reaching)} side exits ({listing}); say which "
                        "one. Fix: route_mask(model, value) with the returned tensor, or producer='<module path>'.")


def _resolve(model):
    """(state, this thread's last program or None, its kept indices per route)."""
    from .transformed import state_of

    st = state_of(model)
    return st, st.last_program, st.last_kept


def route_mask(model, value: torch.Tensor | None = None, *, producer: str | None = None) -> torch.Tensor:
    """Which rows of a side exit are fresh in this thread's last call of ``model``: bool ``[B, T]`` over its
    token axis (True = computed by the routed blocks in that call).

    The side exit is named by ``value``, a tensor exactly as the last (eager) call returned it, or by
    ``producer``: the module path that computes it inside the route (``"blocks.3"``), its readable name, or a model
    output path (``"output[1][0]"``); with neither, the one side exit that reaches a model output.  Guarantees: in
    the default ``side_exits`` mode the mask is True exactly at the route's kept image tokens (the recorded
    ``last_routes(model)[r].kept``) and at extra tokens (class/text tokens, never routed), False at the skipped
    ones; with ``side_exits="kept"`` every delivered row is fresh (all True, ``[B, T_kept]``); after an eval or
    otherwise unrouted call, or when the route dropped nothing, all True.  Raises :class:`SideExitError` naming the
    side exits when the choice is ambiguous or not found.
    """
    st, prog, kept_all = _resolve(model)
    if prog is None:
        return _unrouted(st, value, producer, "route_mask")
    exits = side_exits_of(prog)
    e, out = _select(exits, value, producer, st.last_outputs)
    _check_axis(e, out, value)
    kept = kept_all[e.route] if e.route < len(kept_all) else None
    return e.mask(kept, _batch(e, value))


def route_rows(model, value: torch.Tensor | None = None, *, producer: str | None = None) -> torch.Tensor:
    """For each row of a side exit as the last call delivered it, its token position on the full token axis:
    int64 ``[B, T']``.  With ``side_exits="kept"`` these are the route's kept tokens in delivery order (gather a
    target with them: ``target.gather(1, rows[..., None].expand(-1, -1, D))``); otherwise ``arange(T)``.  Names the
    side exit like :func:`route_mask`."""
    st, prog, kept_all = _resolve(model)
    if prog is None:
        mask = _unrouted(st, value, producer, "route_rows")
        return torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
    exits = side_exits_of(prog)
    e, out = _select(exits, value, producer, st.last_outputs)
    _check_axis(e, out, value)
    kept = kept_all[e.route] if e.route < len(kept_all) else None
    return e.rows(kept, _batch(e, value))


def _batch(e: SideExit, value) -> int:
    if isinstance(value, torch.Tensor) and value.ndim:
        return int(value.shape[0])
    return int(e.node.meta["val"].shape[0])  # programs are specialised on input shapes, so on the batch


def _check_axis(e: SideExit, out: ExitOutput | None, value) -> None:
    if out is not None and out.axis is None:
        raise SideExitError(
            f"route_mask: {out.path} is computed from {e.name} (route {e.route}), but treadfx cannot tell which of "
            f"its axes holds the {e.length} tokens, so no row mask applies to it. Fix: return the value with its "
            "token axis intact ([B, T, ...]), or end the route before " f"`{e.producer}`.")


def _unrouted(st, value, producer, fn: str) -> torch.Tensor:
    """All-True mask of an unrouted call: [B, T] from ``value`` (token axis from the traced side exit, else 1)."""
    if not isinstance(value, torch.Tensor) or value.ndim < 2:
        raise SideExitError(
            f"{fn}: the last call of the model did not route (eval mode, no gradients, or no call yet), so every "
            "row is fresh, but without the returned tensor treadfx does not know its shape. Fix: pass the value: "
            f"treadfx.{fn}(model, value).")
    axis = 1
    prog = st.current
    if prog is not None:
        for e in side_exits_of(prog):
            for o in e.outputs:
                if producer in (None, e.producer, e.name, o.path) and o.axis is not None and o.axis < value.ndim:
                    axis = o.axis
                    break
            else:
                continue
            break
    return torch.ones(value.shape[0], value.shape[axis], dtype=torch.bool, device=value.device)
