"""Errors raised by treadfx.

Every error a user can trigger is a :class:`TransformError` subclass whose
message names the problem *and* the fix.  None of them is raised after the
user's module has been touched: ``transform`` validates before it builds.
"""

from __future__ import annotations

__all__ = [
    "TransformError",
    "InvalidRatioError",
    "InvalidRouteError",
    "NoBlocksFoundError",
    "AmbiguousChainError",
    "TokenCountError",
    "UntraceableForwardError",
    "StreamAnalysisError",
    "UnroutableRegionError",
    "CompileTimeTraceError",
]


class TransformError(Exception):
    """Base class of every error treadfx raises about a model or its arguments."""


class InvalidRatioError(TransformError, ValueError):
    """A selection ratio outside [0, 1) or not a number."""


class InvalidRouteError(TransformError, ValueError):
    """Routes out of range, reversed, overlapping or unordered."""


class NoBlocksFoundError(TransformError):
    """The model has no chain of repeated blocks that carries a token stream."""


class AmbiguousChainError(TransformError):
    """Several block chains could be meant; the user must name one."""


class TokenCountError(TransformError):
    """A route would keep fewer than one token for the actual token count."""


class UntraceableForwardError(TransformError):
    """The forward uses a construct the tracer cannot specialise."""


class StreamAnalysisError(TransformError):
    """The token stream, or how a tensor relates to it, cannot be determined."""


class UnroutableRegionError(TransformError):
    """An operation inside a route depends on the full token count."""


class CompileTimeTraceError(TransformError, RuntimeError):
    """A new input signature reached the model while torch.compile was tracing it."""


class InvalidMoEConfigError(TransformError, ValueError):
    """A ``treadfx.diffmoe`` argument out of range (num_experts, capacity, decay, noise, loss weight)."""


class FFNNotFoundError(TransformError):
    """``treadfx.diffmoe`` cannot find exactly one feed-forward network (FFN) to convert in a block.

    The message names the block and the fix that fits the case: name the FFN
    with ``ffn='<path inside the block>'`` (none found, or several: submodules
    or inline ``Linear -> activation -> Linear`` subgraphs, the latter named by
    their first Linear); pass an ``ffn=`` path that is a submodule with a
    ``Linear D -> ... -> D`` path; move an FFN written in a forward that does not
    trace with torch.fx into a submodule; for an FFN fused with attention (Flux
    single-stream blocks), convert a model with separate MLP Linears or split
    them first; and convert the model as analysed, without changing it in between.
    """


__all__ += ["InvalidMoEConfigError", "FFNNotFoundError"]


class LiveModelError(TransformError):
    """A part of the training stack (a hook, a nested transformed model) that the routed model could not honour."""


__all__ += ["LiveModelError"]
