"""treadfx: TREAD token routing for diffusion transformers as a torch.fx compiler pass.

    model = treadfx.transform(model, start=2, end=-4, ratio=0.5)

In training, a random fraction ``ratio`` of the image tokens skips chain blocks
``start..end`` and re-enters unchanged; in eval the model is the original one.

    model = treadfx.diffmoe(model, num_experts=8)

replaces each (or every other) block's feed-forward with DiffMoE experts fed
from a batch-level token pool, with a capacity predictor for inference.
"""

from .api import (
    apply,
    clone_module_tree,
    diffmoe,
    fixed_routes,
    force_routing,
    inspect,
    keep_tokens,
    last_routes,
    original_class,
    prepare,
    routing_step,
    set_routing_step,
    routing_guidance,
    set_ratio,
    transform,
)
from .errors import (
    AmbiguousChainError,
    CompileTimeTraceError,
    FFNNotFoundError,
    InvalidMoEConfigError,
    InvalidRatioError,
    InvalidRouteError,
    LiveModelError,
    NoBlocksFoundError,
    StreamAnalysisError,
    TokenCountError,
    TransformError,
    UnroutableRegionError,
    UntraceableForwardError,
)
from .moe import DiffMoELayer, DiffMoEStats, diffmoe_loss, diffmoe_stats
from .loss import RouteLoss, route_loss, token_map
from .report import Report
from .schedule import RatioSchedule
from .side_exits import SideExit, SideExitError, SideExitWarning, route_mask, route_rows
from .routes import Route
from .config import DiffMoEConfig, TreadConfig
from .method import DiffMoEMethod, Method, TreadMethod, register_method
from .transformed import RouteRecord, is_transformed

__version__ = "0.1.0"

__all__ = [
    "transform", "apply", "TreadConfig", "DiffMoEConfig", "Method", "TreadMethod", "DiffMoEMethod", "register_method",
    "prepare", "force_routing", "set_ratio", "last_routes", "fixed_routes", "clone_module_tree",
    "original_class", "is_transformed", "Route", "RouteRecord", "inspect", "Report",
    "keep_tokens", "routing_guidance", "routing_step", "set_routing_step", "route_loss", "RouteLoss", "token_map", "RatioSchedule",
    "TransformError", "InvalidRatioError", "InvalidRouteError", "NoBlocksFoundError", "AmbiguousChainError",
    "TokenCountError", "UntraceableForwardError", "StreamAnalysisError", "UnroutableRegionError",
    "CompileTimeTraceError", "LiveModelError",
    "diffmoe", "diffmoe_loss", "diffmoe_stats", "DiffMoELayer", "DiffMoEStats", "FFNNotFoundError",
    "InvalidMoEConfigError",
    "route_mask", "route_rows", "SideExit", "SideExitWarning", "SideExitError",
]

