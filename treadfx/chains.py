"""Chains of block calls in a traced graph.

A *chain* is a maximal run of block calls, in execution order, in which every
call consumes (directly or through non-block operations) the output of the
call before it.  Indices given to ``transform`` count along one chain, so a
route can span two block kinds (Flux double-stream then single-stream blocks,
U-ViT in-blocks, mid-block and out-blocks).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch.fx as fx

from .blocks import BlockCandidate
from .errors import AmbiguousChainError, InvalidRouteError, NoBlocksFoundError, StreamAnalysisError
from .graph_walk import upstream
from .layout import LayoutAnalysis, TokenInfo, tensor_input_nodes

if TYPE_CHECKING:
    from .tracing import TracedProgram
    from .transformed import TransformConfig

__all__ = ["Chain", "find_chains", "resolve_index", "pick_chain", "image_input_index"]


@dataclasses.dataclass
class Chain:
    """Block calls along which a token stream flows."""

    nodes: list[fx.Node]
    paths: list[str]
    classes: list[str]
    hashes: list[str | None]

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def name(self) -> str:
        """Container paths in order, e.g. ``transformer_blocks+single_transformer_blocks``."""
        names: list[str] = []
        for p in self.paths:
            head = p.rsplit(".", 1)[0] if "." in p else p
            if not names or names[-1] != head:
                names.append(head)
        return "+".join(names)

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
        return f"{len(self)} blocks: " + ", then ".join(parts)


def _block_predecessors(node: fx.Node, block_set: set[fx.Node]) -> set[fx.Node]:
    """Block calls whose output reaches ``node`` without passing through another block call."""
    walked = upstream(node.all_input_nodes, expand=lambda n: n not in block_set)
    return {n for n in walked if n in block_set}


def find_chains(gm: fx.GraphModule, candidates: list[BlockCandidate], model_root: str) -> list[Chain]:
    """All chains of candidate-block calls in ``gm``, longest first, ties in graph order."""
    by_target = {f"{model_root}.{c.path}": c for c in candidates}
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in by_target]
    block_set = set(calls)
    chains: list[list[fx.Node]] = []
    for node in calls:
        preds = _block_predecessors(node, block_set)
        if chains and chains[-1][-1] in preds:
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


def pick_chain(chains: list[Chain], analysis: LayoutAnalysis, config: TransformConfig) -> Chain:
    """The chain to route: the one named by ``config.chain``, else the only chain carrying image tokens.

    Raises AmbiguousChainError for an unknown name/index or several image chains, NoBlocksFoundError when no
    chain receives the image stream.
    """
    def carries_image(c: Chain) -> bool:
        for inp in tensor_input_nodes(c.nodes[0]):
            info = analysis.token_info(inp)
            if isinstance(info, TokenInfo) and info.has_image():
                return True
        return False

    if config.chain is not None:
        if isinstance(config.chain, int) and not isinstance(config.chain, bool):
            if not 0 <= config.chain < len(chains):
                raise AmbiguousChainError(
                    f"chain={config.chain} but the model has {len(chains)} chains: "
                    + "; ".join(f"{k}: {c.name} ({len(c)} blocks)" for k, c in enumerate(chains))
                    + ". Fix: pass one of those indices or names."
                )
            return chains[config.chain]
        for c in chains:
            if c.name == config.chain or config.chain in c.name.split("+"):
                return c
        raise AmbiguousChainError(
            f"chain={config.chain!r} names no chain; the model has: "
            + "; ".join(f"{c.name!r} ({len(c)} blocks)" for c in chains) + ". Fix: pass one of those names."
        )
    image_chains = [c for c in chains if carries_image(c)]
    if not image_chains:
        raise NoBlocksFoundError(
            "treadfx found repeated blocks ("
            + "; ".join(f"{c.name}: {len(c)}" for c in chains)
            + ") but none of them receives the image token stream. Fix: make sure the image (noisy latent) is the "
            "first tensor argument of forward or name it with stream='<argument>', and that blocks take [B, N, D] tokens."
        )
    if len(image_chains) > 1:
        raise AmbiguousChainError(
            "the model has several chains of repeated blocks carrying image tokens: "
            + "; ".join(f"{c.name!r} ({c.describe()})" for c in image_chains)
            + ". Route indices would be ambiguous. Fix: pass chain='<name>' to transform()."
        )
    return image_chains[0]


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
