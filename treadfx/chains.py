"""Chains of block calls in a traced graph.

A *chain* is a maximal run of block calls, in execution order, in which every
call consumes (directly or through non-block operations) the output of the
call before it.  Indices given to ``transform`` count along one chain, so a
route can span two block kinds (Flux double-stream then single-stream blocks,
U-ViT in-blocks, mid-block and out-blocks).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import TYPE_CHECKING

import torch.fx as fx

from .blocks import BlockCandidate
from .errors import AmbiguousChainError, InvalidRouteError, NoBlocksFoundError, StreamAnalysisError
from .graph_walk import upstream
from .layout import LayoutAnalysis, TokenInfo, layout_str, tensor_input_nodes

if TYPE_CHECKING:
    from .tracing import TracedProgram
    from .transformed import TransformConfig

__all__ = ["Chain", "find_chains", "resolve_index", "split_at_stream_changes", "pick_chain", "image_input_index"]


@dataclasses.dataclass
class Chain:
    """Block calls along which a token stream flows."""

    nodes: list[fx.Node]
    paths: list[str]
    classes: list[str]
    hashes: list[str | None]
    note: str = ""  # why this chain is (not) the routed one; set by pick_chain, printed by inspect
    #: (name of the whole chain, first, last block index in it) when ``chain=`` named this part of a merged chain
    part_of: tuple[str, int, int] | None = None

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def name(self) -> str:
        """Container paths in order, e.g. ``transformer_blocks+single_transformer_blocks``."""
        return "+".join(head for head, _a, _b in self.parts())

    def parts(self) -> list[tuple[str, int, int]]:
        """Runs of blocks from the same container, in order: (container path, first index, last index)."""
        runs: list[tuple[str, int, int]] = []
        for i, p in enumerate(self.paths):
            head = p.rsplit(".", 1)[0] if "." in p else p
            if runs and runs[-1][0] == head:
                runs[-1] = (head, runs[-1][1], i)
            else:
                runs.append((head, i, i))
        return runs

    def sub(self, a: int, b: int) -> "Chain":
        """Blocks ``a..b`` (inclusive) as a chain of their own."""
        return Chain(self.nodes[a:b + 1], self.paths[a:b + 1], self.classes[a:b + 1], self.hashes[a:b + 1])

    def segments(self) -> list[tuple[int, int, str, str]]:
        """Runs of the same block kind: (first index, last index, class, container)."""
        runs: list[tuple[int, int, str, str]] = []
        for i, (p, c, h) in enumerate(zip(self.paths, self.classes, self.hashes)):
            head = p.rsplit(".", 1)[0] if "." in p else p
            if runs and runs[-1][2] == f"{c}#{h}" and runs[-1][3] == head:
                runs[-1] = (runs[-1][0], i, runs[-1][2], head)
            else:
                runs.append((i, i, f"{c}#{h}", head))
        return [(a, b, k.split("#")[0], h) for a, b, k, h in runs]

    def describe(self) -> str:
        parts = []
        for a, b, cls, head in self.segments():
            parts.append(f"{head}[{self.paths[a].rsplit('.', 1)[-1]}..{self.paths[b].rsplit('.', 1)[-1]}] {cls} x{b - a + 1}")
        return f"{_blocks(len(self))}: " + ", then ".join(parts)


def _blocks(n: int) -> str:
    return f"{n} block" + ("" if n == 1 else "s")


def _writes_into(node: fx.Node, before: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """Inputs of the in-place writes into ``node`` (``buf[i, a:b] = v``, ``buf.add_(v)``) made before ``before``:
    a buffer assembled by writes carries the data written into it."""
    out: list[fx.Node] = []
    for u in node.users:
        if order.get(u, -1) >= order.get(before, 0) or not u.args or u.args[0] is not node:
            continue
        t = str(u.target)
        if (u.op == "call_function" and u.target is operator.setitem) or (
                u.op == "call_method" and t.endswith("_") and not t.endswith("__")):
            out.extend(i for i in u.all_input_nodes if i is not node)
    return out


def _block_predecessors(node: fx.Node, block_set: set[fx.Node], order: dict[fx.Node, int] | None = None,
                        written: set[fx.Node] | None = None) -> set[fx.Node]:
    """Block calls whose output reaches ``node`` without passing through another block call, also through
    in-place writes into a buffer that ``node`` reads (a joint sequence assembled slice by slice); those reached
    through such writes are also added to ``written``."""
    if order is None:
        order = {n: k for k, n in enumerate(node.graph.nodes)}

    def expand(n: fx.Node) -> bool:
        return n not in block_set and not _metadata_only(n)

    seen: set[fx.Node] = set()
    stack = list(upstream(node.all_input_nodes, expand=expand))
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in block_set:
            continue
        for w in _writes_into(n, node, order):
            reached = list(upstream([w], expand=expand))
            if written is not None:
                written.update(r for r in reached if r in block_set)
            stack.extend(reached)
    return {n for n in seen if n in block_set}


_METADATA_METHODS = frozenset({"new_zeros", "new_ones", "new_empty", "new_full"})
_METADATA_FUNCS = frozenset({"zeros_like", "ones_like", "empty_like", "full_like"})


def _metadata_only(n: fx.Node) -> bool:
    """``x.new_zeros(...)``, ``torch.zeros_like(x)``: reads only the shape, dtype and device of its inputs."""
    if n.op == "call_method":
        return n.target in _METADATA_METHODS
    return n.op == "call_function" and getattr(n.target, "__name__", "") in _METADATA_FUNCS


def find_chains(gm: fx.GraphModule, candidates: list[BlockCandidate], model_root: str) -> list[Chain]:
    """All chains of candidate-block calls in ``gm``, longest first, ties in graph order."""
    by_target = {f"{model_root}.{c.path}": c for c in candidates}
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in by_target]
    block_set = set(calls)
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    chains: list[list[fx.Node]] = []
    for node in calls:
        written: set[fx.Node] = set()
        preds = _block_predecessors(node, block_set, order, written)
        merging = sum(1 for c in chains if c[-1] in written)
        # a block whose input buffer is assembled from the outputs of two chains (Lumina2's joint blocks after the
        # noise and the context refiners) starts a new chain: counting route indices along either branch into it
        # would be arbitrary
        if chains and chains[-1][-1] in preds and merging < 2:
            chains[-1].append(node)
        else:
            chains.append([node])
    out = []
    for nodes in chains:
        cands = [by_target[n.target] for n in nodes]
        out.append(Chain(nodes, [c.path for c in cands], [c.class_name for c in cands], [c.wl_hash for c in cands]))
    order = {id(c): i for i, c in enumerate(out)}
    out.sort(key=lambda c: (-len(c), order[id(c)]))
    return out


def resolve_index(index: int, length: int, what: str) -> int:
    """A 0-based chain index from a possibly negative one; raises InvalidRouteError if out of range."""
    if not isinstance(index, int) or isinstance(index, bool):
        raise InvalidRouteError(f"route {what} must be an int, got {index!r}. Fix: pass a block index such as 2 or -4.")
    resolved = index + length if index < 0 else index
    if not 0 <= resolved < length:
        raise InvalidRouteError(
            f"route {what}={index} is out of range for a chain of {length} blocks "
            f"(valid: {-length}..{length - 1}). Fix: choose {what} inside the chain; negative indices count from the end."
        )
    return resolved


def _stream_inputs(node: fx.Node, analysis: LayoutAnalysis) -> list[fx.Node]:
    """The tensor inputs of block call ``node`` that its outputs carry (the streams it updates, found by
    ``analysis.block_carry``) when some of them have a token axis, else all its tensor inputs."""
    inputs = tensor_input_nodes(node)
    try:
        carried = [n for n in (analysis.block_carry(node) or {}).values() if isinstance(n, fx.Node)]
    except Exception:  # noqa: BLE001 - no carry information: every input counts
        carried = []
    if any(isinstance(analysis.token_info(n), TokenInfo) for n in carried):
        return [n for n in inputs if n in carried]
    return inputs


def _image_inputs_of(node: fx.Node, analysis: LayoutAnalysis) -> list[fx.Node]:
    """Tensor inputs of the block call ``node`` whose token axis holds image tokens.

    Only the streams the block carries count when they are known (:func:`_stream_inputs`): a side input such
    as a RoPE table computed next to the image patches (Lumina2's caption rotary rows) does not make a text
    refiner an image block."""
    inputs = _stream_inputs(node, analysis)
    out = []
    for inp in inputs:
        info = analysis.token_info(inp)
        if isinstance(info, TokenInfo) and info.has_image():
            out.append(inp)
    return out


def _feeds(chain: Chain, other: Chain) -> bool:
    """The outputs of ``chain``'s last block reach ``other``'s first block (through in-place writes too)."""
    if chain is other:
        return False
    first = other.nodes[0]
    block_set = set(chain.nodes) | set(other.nodes)
    return chain.nodes[-1] in _block_predecessors(first, block_set)


def _fed_blocks(chain: Chain, other: Chain) -> list[fx.Node]:
    """The blocks of ``other`` that an output of one of ``chain``'s blocks reaches without passing through another
    block (directly, through in-place writes, or added into ``other``'s stream between two of its blocks)."""
    if chain is other:
        return []
    block_set = set(chain.nodes) | set(other.nodes)
    mine = set(chain.nodes)
    order = {n: k for k, n in enumerate(other.nodes[0].graph.nodes)}
    return [n for n in other.nodes if _block_predecessors(n, block_set, order) & mine]


def _side_branch_of(chain: Chain, image_chains: list[Chain]) -> tuple[Chain, list[fx.Node]] | None:
    """``(main, fed)`` when ``chain`` is a side branch of the image chain ``main``: its outputs are added into
    ``main``'s stream at the blocks ``fed`` (WanVACE's control hints, added after some of Wan's blocks) but its last
    block does not feed ``main``'s first block (a refiner does). None when it is no side branch."""
    for other in image_chains:
        fed = _fed_blocks(chain, other)
        if fed and not _feeds(chain, other):
            return other, fed
    return None


def _side_branch_note(main: Chain, fed: list[fx.Node]) -> str:
    where = ", ".join(f"`{main.paths[main.nodes.index(n)]}`" for n in fed)
    return (f"a side branch: its outputs are added into the image stream of `{main.name}` (into the inputs of "
            f"{where}), the chain that carries the image tokens to the output; a skipped token would have no "
            "value of its own to keep in these outputs (they are not its input carried through), so the side branch "
            "runs on every token")


def _input_name(ph: fx.Node) -> str:
    return ph.meta.get("input_name", ph.name)


def _shape(node: fx.Node) -> str:
    v = node.meta.get("val")
    return str(list(v.shape)) if hasattr(v, "shape") else type(v).__name__


def _receives(node: fx.Node, analysis: LayoutAnalysis) -> str:
    """What the block call ``node`` gets along token axes, e.g. ``[text 5] from `encoder_hidden_states```."""
    seen: list[str] = []
    for inp in _stream_inputs(node, analysis):
        info = analysis.token_info(inp)
        if not isinstance(info, TokenInfo):
            continue
        srcs = sorted(_input_name(p) for p in analysis.provenance.get(inp, ()) if p in analysis.placeholders
                      and isinstance(analysis.token_info(p), TokenInfo))
        text = layout_str(info.layout) + (f" from {', '.join(f'`{s}`' for s in srcs)}" if srcs else "")
        if text not in seen:
            seen.append(text)
    return "; ".join(seen) if seen else "no [B, N, D] token sequence"


def split_at_stream_changes(chains: list[Chain], analysis: LayoutAnalysis) -> list[Chain]:
    """Every chain cut where its blocks start or stop receiving image tokens, longest first (ties in graph order).

    A short chain that prepares a side input (HunyuanVideo's text token refiner, HiDream's caption projections)
    feeds the first image block only through a side argument, yet ``find_chains`` links it to that block. Cut
    there, the image blocks form their own chain, so route indices count only blocks that carry image tokens.
    A cut-off run's ``note`` says why it is separate.
    """
    out: list[Chain] = []
    for c in chains:
        flags = [bool(_image_inputs_of(n, analysis)) for n in c.nodes]
        start = 0
        for k in range(1, len(c) + 1):
            if k == len(c) or flags[k] != flags[start]:
                part = Chain(c.nodes[start:k], c.paths[start:k], c.classes[start:k], c.hashes[start:k])
                if start or k < len(c):
                    nxt = c.paths[k] if k < len(c) else None
                    if flags[start]:
                        part.note = f"cut from `{c.name}`, whose other blocks receive no image tokens"
                    else:
                        part.note = (f"cut from `{c.name}`: its blocks receive no image tokens "
                                     f"({_receives(part.nodes[0], analysis)})"
                                     + (f" and feed `{nxt}` only a side input" if nxt else ""))
                out.append(part)
                start = k
    order = {id(n): i for i, n in enumerate(n for c in chains for n in c.nodes)}
    out.sort(key=lambda c: (-len(c), order[id(c.nodes[0])]))
    return out


def _no_image_chain_error(chains: list[Chain], analysis: LayoutAnalysis, config: TransformConfig) -> NoBlocksFoundError:
    """NoBlocksFoundError saying what the chains receive, what the image input is, and the fix that applies."""
    img = analysis.image_ph
    img_name = _input_name(img)
    found = "; ".join(f"`{c.name}` ({len(c)} blocks; its first block receives {_receives(c.nodes[0], analysis)})"
                      for c in chains)
    how = f"stream={config.stream!r}" if config.stream is not None else "the first tensor input of forward"
    head = (f"treadfx found repeated blocks ({found}) but none of them receives tokens of the image input "
            f"`{img_name}` {_shape(img)} ({how}).")
    # inputs that do reach a chain's first block along a token axis: candidates for stream=
    reaching: list[str] = []
    for c in chains:
        for inp in tensor_input_nodes(c.nodes[0]):
            if not isinstance(analysis.token_info(inp), TokenInfo):
                continue
            for p in analysis.placeholders:
                if (p is not img and p in analysis.provenance.get(inp, ()) and isinstance(analysis.token_info(p), TokenInfo)
                        and _input_name(p) not in reaching):
                    reaching.append(_input_name(p))
    if not isinstance(analysis.token_info(img), TokenInfo):
        why = (f" `{img_name}` has no token axis: a token stream is a [B, N, D] sequence (or a [B, C, H, W] latent "
               f"patchified into one) whose batch size B is shared by the other inputs.")
    elif any(img in analysis.provenance.get(inp, ()) for c in chains for n in c.nodes for inp in tensor_input_nodes(n)):
        why = (f" `{img_name}` reaches the blocks only through values without its token axis (pooled or reduced "
               "over the tokens), so there is no image token to drop.")
    else:
        why = f" `{img_name}` does not reach any of these blocks."
    if reaching:
        fix = (f" Fix: if the image (noisy latent) is {', '.join(f'`{r}`' for r in reaching)}, pass "
               f"stream='{reaching[0]}'.")
    else:
        fix = (" No input reaches the blocks along a token axis, so stream= would not help. Fix: treadfx routes "
               "transformer blocks that take the image as [B, N, D] tokens; route a model whose blocks do.")
    return NoBlocksFoundError(head + why + fix)


def _chain_listing(chains: list[Chain]) -> str:
    """``'a+b' (4 blocks: parts 'a' (blocks 0..1), 'b' (blocks 2..3)); 'c' (2 blocks)``."""
    out = []
    for c in chains:
        parts = c.parts()
        if len(parts) > 1:
            out.append(f"{c.name!r} ({_blocks(len(c))}: parts "
                       + ", ".join(f"{h!r} (blocks {a}..{b})" for h, a, b in parts) + ")")
        else:
            out.append(f"{c.name!r} ({_blocks(len(c))})")
    return "; ".join(out)


def _named_chain(chains: list[Chain], name: str | int) -> tuple[Chain, Chain, tuple[int, int]]:
    """``(named, whole, (a, b))``: the chain ``chain=name`` selects, the chain it is part of, and its blocks there.

    An index or a chain's name selects that whole chain (``named is whole``); the name of one part of a merged
    chain, or of consecutive parts joined by ``+``, selects those blocks as a new chain. AmbiguousChainError for
    an index out of range, a name that matches nothing (listing every chain with its parts) or parts of several
    chains."""
    if isinstance(name, int) and not isinstance(name, bool):
        if not 0 <= name < len(chains):
            raise AmbiguousChainError(
                f"chain={name} but the model has {len(chains)} chains: "
                + "; ".join(f"{k}: {c.name} ({len(c)} blocks)" for k, c in enumerate(chains))
                + ". Fix: pass one of those indices or names."
            )
        return chains[name], chains[name], (0, len(chains[name]) - 1)
    if not isinstance(name, str):
        raise AmbiguousChainError(f"chain={name!r} must be a chain's name (str) or index (int). Fix: pass one of: "
                                  f"{_chain_listing(chains)}.")
    whole = next((c for c in chains if c.name == name), None)
    if whole is not None:
        return whole, whole, (0, len(whole) - 1)
    want = name.split("+")
    found: list[tuple[Chain, int, int]] = []
    for c in chains:
        parts = c.parts()
        for i in range(len(parts) - len(want) + 1):
            if [h for h, _a, _b in parts[i:i + len(want)]] == want:
                found.append((c, parts[i][1], parts[i + len(want) - 1][2]))
    if not found:
        raise AmbiguousChainError(
            f"chain={name!r} names no chain and no part of one; the model has: {_chain_listing(chains)}. Fix: pass "
            "one of those names (a part's name routes only its blocks, and start/end count within it)."
        )
    if len(found) > 1:
        raise AmbiguousChainError(
            f"chain={name!r} names blocks of several chains: "
            + "; ".join(f"blocks {a}..{b} of {c.name!r}" for c, a, b in found)
            + f". Fix: pass the name of the whole chain to route; the model has: {_chain_listing(chains)}."
        )
    c, a, b = found[0]
    part = c.sub(a, b)
    part.part_of = (c.name, a, b)
    return part, c, (a, b)


def _check_routes_fit(chain: Chain, chains: list[Chain], config: TransformConfig) -> None:
    """InvalidRouteError for a route start/end outside ``chain``, naming the chain, its length and the chains not
    counted."""
    n = len(chain)
    for k, r in enumerate(getattr(config, "routes", None) or ()):
        for what in ("start", "end"):
            v = getattr(r, what)
            if not isinstance(v, int) or -n <= v < n:
                continue
            msg = (f"route {k} {what}={v} is out of range for the routed chain `{chain.name}` ({chain.describe()}), "
                   f"so valid indices are {-n}..{n - 1}")
            if chain.part_of is not None:
                whole, a, b = chain.part_of
                msg += (f"; chain={config.chain!r} names blocks {a}..{b} of the chain `{whole}`, and start/end count "
                        "within them")
            skip = chain.part_of[0] if chain.part_of is not None else None
            others = [c for c in chains if c is not chain and c.name != skip]
            if others:
                msg += ("; not routed, so not counted: "
                        + ", ".join(f"`{c.name}` ({_blocks(len(c))})" for c in others))
            msg += f". Fix: choose {what} inside the routed chain; negative indices count from its end"
            if chain.part_of is not None:
                msg += f", or pass chain={chain.part_of[0]!r} to count along the whole chain"
            raise InvalidRouteError(msg + ".")


def pick_chain(chains: list[Chain], analysis: LayoutAnalysis, config: TransformConfig) -> Chain:
    """The chain to route: the one named by ``config.chain``, else the only chain whose blocks receive image tokens.

    ``chain=`` names a chain by its index in ``chains`` or by its name; the name of one part of a merged chain
    (``single_transformer_blocks`` of ``transformer_blocks+single_transformer_blocks``), or of a run of
    consecutive parts, selects only that part's blocks: the part is routed as a chain of its own, appended to
    ``chains``, so start/end count within it (negative indices from its end). The whole merged chain's name
    counts along all its blocks. The routes' start/end are then checked against the chosen chain: an
    InvalidRouteError names it, its length, and the chains that are not counted.
    """
    chosen = _pick_chain(chains, analysis, config)
    _check_routes_fit(chosen, chains, config)
    return chosen


def _pick_chain(chains: list[Chain], analysis: LayoutAnalysis, config: TransformConfig) -> Chain:
    """:func:`pick_chain` without the route range check.

    ``chains`` is first replaced, in place, by :func:`split_at_stream_changes` of itself, so a side-input chain
    (a text refiner) linked to the image blocks is neither routed nor counted in route indices; every chain's
    ``note`` then says why it is or is not the routed one (``inspect`` prints it). Raises AmbiguousChainError for
    an unknown name/index or several image chains none of which the others feed, NoBlocksFoundError when no chain
    (or the named one) receives the image stream, InvalidRouteError when the named chain is a side branch whose
    outputs are added into the main chain's stream (WanVACE's `vace_blocks`), with advice that fits what was found.
    """
    chains[:] = split_at_stream_changes(chains, analysis)
    image_chains = [c for c in chains if _image_inputs_of(c.nodes[0], analysis)]

    carrying = {id(c) for c in image_chains}

    def routed_because(c: Chain, why: str) -> Chain:
        c.note = why + (f"; {c.note}" if c.note else "")
        for other in chains:
            if other is not c:
                reason = other.note or (
                    "another chain was chosen" if id(other) in carrying
                    else f"its blocks receive no image tokens ({_receives(other.nodes[0], analysis)})")
                other.note = "not routed: " + reason
        return c

    if config.chain is not None:
        named, parent, span = _named_chain(chains, config.chain)
        if id(parent) in carrying:
            side = _side_branch_of(parent, image_chains)
            if side is not None:
                main, fed = side
                raise InvalidRouteError(
                    f"chain={config.chain!r} selects `{parent.name}`, {_side_branch_note(main, fed)}. Fix: route "
                    f"`{main.name}` (the default, or chain={main.name!r}); its blocks then see the full side-branch "
                    "outputs added to their stream.")
        if id(parent) not in carrying or not _image_inputs_of(named.nodes[0], analysis):
            if not image_chains:
                raise _no_image_chain_error(chains, analysis, config)
            others = "; ".join(f"{c.name!r} ({_blocks(len(c))})" for c in image_chains)
            raise NoBlocksFoundError(
                f"chain={config.chain!r} selects `{named.name}`, whose blocks receive no image tokens (its first block "
                f"receives {_receives(named.nodes[0], analysis)}), so routing it would drop no image token. "
                f"Chains that receive image tokens: {others}. Fix: pass one of those to chain=."
            )
        if named is parent:
            chosen = routed_because(named, f"routed: named by chain={config.chain!r}")
        else:
            a, b = span
            before = parent.note
            chains.append(named)
            chosen = routed_because(named, f"routed: named by chain={config.chain!r}; start/end count within "
                                    f"`{named.name}`, blocks {a}..{b} of the chain `{parent.name}`")
            parent.note = (f"not routed as a whole: chain={config.chain!r} names its blocks {a}..{b} "
                           f"(`{parent.paths[a]}` .. `{parent.paths[b]}`), routed as chain {len(chains) - 1}; to "
                           f"count start/end along all {len(parent)} blocks, pass chain={parent.name!r}"
                           + (f"; {before}" if before else ""))
        return chosen
    if not image_chains:
        raise _no_image_chain_error(chains, analysis, config)
    if len(image_chains) > 1:
        # refiners: chains whose image stream is written into another image chain's input (Lumina2's
        # noise_refiner feeds the joint `layers`); the chain that no other image chain follows is the main one
        # side branches: chains whose outputs are added into another image chain's stream between its blocks
        # (WanVACE's control hints into Wan's `blocks`); the chain that no other image chain feeds is the main one
        last = [c for c in image_chains if not any(_feeds(c, o) or _fed_blocks(c, o) for o in image_chains)]
        if len(last) == 1:
            main = last[0]
            for c in image_chains:
                if c is not main:
                    fed = _fed_blocks(c, main)
                    why = (f"a refiner: its image tokens are written into the input of `{main.name}`, the chain "
                           "that carries them on to the output") if _feeds(c, main) or not fed else \
                        _side_branch_note(main, fed)
                    c.note = why + (f"; {c.note}" if c.note else "")
            return routed_because(main, "routed: the chain that carries the image tokens to the output (the other "
                                  "image chains feed it)")
        raise AmbiguousChainError(
            "the model has several chains of repeated blocks carrying image tokens: "
            + "; ".join(f"{c.name!r} ({c.describe()})" for c in image_chains)
            + ". Route indices would be ambiguous. Fix: pass chain='<name>' to transform()."
        )
    c = image_chains[0]
    names = sorted({_input_name(p) for inp in _image_inputs_of(c.nodes[0], analysis)
                    for p in analysis.provenance.get(inp, ()) if p is analysis.image_ph})
    return routed_because(c, "routed: the only chain whose blocks receive image tokens"
                          + (f" (from `{names[0]}`)" if names else ""))


def image_input_index(prog: TracedProgram, config: TransformConfig) -> int:
    """Position of the image (noisy latent) among the traced tensor inputs: 0, or the one named by ``config.stream``.

    Raises StreamAnalysisError when ``stream=`` names no tensor input.
    """
    if config.stream is None:
        return 0
    names = prog.input_names
    for k, name in enumerate(names):
        if name == config.stream or name.split(".")[0] == config.stream:
            return k
    raise StreamAnalysisError(
        f"stream={config.stream!r} names no tensor input of forward; its tensor inputs are {names}. "
        "Fix: pass the name of the argument that carries the image (noisy latent)."
    )
