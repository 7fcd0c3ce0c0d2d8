"""One interface for the model transformations treadfx applies (TREAD, DiffMoE, and any later one).

``treadfx.apply(model, config)`` looks up the :class:`Method` registered for
the config's class and runs its template (:meth:`Method.apply`)::

    check_model -> config.validate -> plan -> copy (unless inplace) -> rewrite -> record -> finish

(*record*: the method is appended to the result's ``_treadfx_methods``, which
:func:`methods_of` and :func:`treadfx.inspect` read.)

A new method subclasses :class:`Method` and overrides the named points, as a
peft tuner overrides ``BaseTuner``'s:

* :meth:`Method.check_model`: refuse a model the method cannot take (before anything changes);
* :meth:`Method.plan`: analyse the model against the config; raise before anything changes;
* :meth:`Method.copy`: the copy that ``inplace=False`` rewrites;
* :meth:`Method.rewrite`: apply the plan to the copy;
* :meth:`Method.finish`: work that needs the rewritten model (TREAD traces ``example_inputs`` now);
* :meth:`Method.runtime_outputs`: what the runtime does with the extra outputs a rewritten graph returns
  after the user's outputs, once per routed forward;
* :meth:`Method.report_section`: the method's part of :func:`treadfx.inspect`'s report;
* :meth:`Method.plan_graph` / :meth:`Method.rewrite_graph`: for a method that rewrites the traced graph (TREAD),
  the ``plan_routes`` and ``rewrite`` stages of :func:`treadfx.pipeline.build`;
* :meth:`Method.found_in`: the instance of the method applied to a model (default: the one ``apply`` recorded).

:class:`TreadMethod` routes tokens through a rewritten graph per input
signature (:mod:`treadfx.pipeline` builds it lazily); :class:`DiffMoEMethod`
is an adapter over :mod:`treadfx.passes.diffmoe` (find each block's FFN,
swap in DiffMoE layers).
"""

from __future__ import annotations

import abc
import copy as _copy
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .config import DiffMoEConfig, TransformConfig, TreadConfig
from .errors import LiveModelError, TransformError
from .moe import diffmoe_layers
from .passes.diffmoe import DiffMoEPass, FFNMatch
from .pipeline import LaidOut, Planned, Rewritten, insert_routes, plan_tread_routes
from .report import Inspection, diffmoe_section, tread_section
from .transformed import (RoutedProgram, TreadState, attach, clone_module_tree, is_transformed, prepare_now, state_of,
                          unwrap)

__all__ = ["Method", "TreadMethod", "DiffMoEMethod", "apply", "register_method", "method_for", "methods_of"]

#: where ``Method.apply`` records the methods applied to a model (a tuple in the module's ``__dict__``)
_APPLIED = "_treadfx_methods"


class Method(abc.ABC):
    """A model transformation configured by one config class; see the module docstring for the override points."""

    #: the config class this method handles (``treadfx.apply`` dispatches on it)
    config_class: ClassVar[type]
    #: the public function that is sugar for this method, named in error messages
    entry_point: ClassVar[str]

    def __init__(self, config: Any):
        if not isinstance(config, self.config_class):
            raise TransformError(f"{type(self).__name__} takes a {self.config_class.__name__}, got "
                                 f"{type(config).__name__}. Fix: pass treadfx.{self.config_class.__name__}(...).")
        self.config = config

    # ---------------------------------------------------------------- override points
    def check_model(self, model: nn.Module) -> None:
        """Refuse what is not a bare ``nn.Module`` (wrappers are applied after the method)."""
        if not isinstance(model, nn.Module):
            raise TransformError(f"{self.entry_point}() needs a torch.nn.Module, got {type(model).__name__}. "
                                 "Fix: pass the model.")
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) or \
                hasattr(model, "_orig_mod"):
            verb = "transform" if self.entry_point == "transform" else "convert"
            raise TransformError(
                f"{self.entry_point}() got a {type(model).__name__} wrapper. Fix: {verb} the bare model first, then "
                "wrap it (DDP / FSDP / torch.compile)."
            )

    @abc.abstractmethod
    def plan(self, model: nn.Module, example_inputs: tuple | None, example_kwargs: dict | None) -> Any:
        """What the rewrite will do to ``model``; raises a TransformError subclass before anything changes."""

    def copy(self, model: nn.Module) -> nn.Module:
        """The model ``inplace=False`` rewrites (default: ``copy.deepcopy``)."""
        return _copy.deepcopy(model)

    @abc.abstractmethod
    def rewrite(self, target: nn.Module, plan: Any) -> nn.Module:
        """Apply ``plan`` to ``target`` and return the transformed model."""

    def finish(self, model: nn.Module, example_inputs: tuple | None, example_kwargs: dict | None) -> None:
        """Work on the transformed model before ``apply`` returns it (default: none)."""

    def runtime_outputs(self, state: TreadState, program: RoutedProgram, extra: list) -> None:
        """Consume the outputs a rewritten graph returns after the user's, once per routed forward (default:
        none are expected)."""

    def report_section(self, inspection: Inspection) -> dict[str, Any]:
        """This method's part of :func:`treadfx.inspect`'s report, as ``{name: value}`` (default: nothing).

        ``inspection`` holds the model, its routed program for the inspect
        inputs and the inputs.  A name that is a section field of
        :class:`treadfx.Report` (``routes``, ``token_map``, ``side_exits``,
        ``diffmoe``, ``diffmoe_inference``) fills it; any other name goes to
        ``Report.sections``, printed as ``name: str(value)``.
        """
        return {}

    def plan_graph(self, laid: LaidOut) -> Planned:
        """The ``plan_routes`` stage of :func:`treadfx.pipeline.build` for a method attached to the traced graph
        (default: refused, the method does not rewrite graphs)."""
        raise TransformError(f"{type(self).__name__} does not rewrite traced graphs. Fix: override plan_graph and "
                             "rewrite_graph (see TreadMethod), or attach a TreadMethod.")

    def rewrite_graph(self, planned: Planned) -> Rewritten:
        """The ``rewrite`` stage of :func:`treadfx.pipeline.build` (default: refused, as :meth:`plan_graph`)."""
        raise TransformError(f"{type(self).__name__} does not rewrite traced graphs. Fix: override plan_graph and "
                             "rewrite_graph (see TreadMethod), or attach a TreadMethod.")

    @classmethod
    def found_in(cls, model: nn.Module) -> "Method | None":
        """The instance of this method applied to ``model`` (recorded by :meth:`apply`), or None."""
        return next((m for m in model.__dict__.get(_APPLIED, ()) if type(m) is cls), None)

    def __deepcopy__(self, memo):
        """Copies of a model share its methods (a method is its configuration, which is not changed after apply)."""
        return self

    # ---------------------------------------------------------------- template
    def apply(self, model: nn.Module, *, inplace: bool = False, example_inputs: tuple | None = None,
              example_kwargs: dict | None = None) -> nn.Module:
        """Check, validate, plan, copy (unless ``inplace``), rewrite, record the method on the result, finish;
        nothing is changed when a step before the rewrite raises."""
        self.check_model(model)
        self.config.validate()
        plan = self.plan(model, example_inputs, example_kwargs)
        target = model if inplace else self.copy(model)
        out = self.rewrite(target, plan)
        out.__dict__[_APPLIED] = (*out.__dict__.get(_APPLIED, ()), self)
        self.finish(out, example_inputs, example_kwargs)
        return out


_REGISTRY: dict[type, type[Method]] = {}


def register_method(method: type[Method]) -> type[Method]:
    """Register ``method`` as the handler of its ``config_class`` (usable as a class decorator)."""
    _REGISTRY[method.config_class] = method
    return method


def method_for(config: Any) -> Method:
    """The registered method for this config object; TransformError naming the config classes otherwise."""
    cls = _REGISTRY.get(type(config))
    if cls is None:
        known = ", ".join(c.__name__ for c in _REGISTRY)
        raise TransformError(f"no treadfx method takes a {type(config).__name__}. Fix: pass one of: {known}.")
    return cls(config)


def methods_of(model: nn.Module) -> list[Method]:
    """The methods applied to ``model`` (the module itself, unwrapped by the caller), in registration order
    (TREAD, DiffMoE, then methods registered later): each registered method's :meth:`Method.found_in`."""
    found: list[Method] = []
    for cls in _REGISTRY.values():
        m = cls.found_in(model)
        if m is not None and all(m is not f for f in found):
            found.append(m)
    return found


def apply(model: nn.Module, config: Any, *, inplace: bool = False, example_inputs: tuple | None = None,
          example_kwargs: dict | None = None) -> nn.Module:
    """Transform ``model`` with the method of ``config`` (:class:`~treadfx.TreadConfig`,
    :class:`~treadfx.DiffMoEConfig`).

    Guarantees: every invalid argument raises a
    :class:`~treadfx.TransformError` subclass before anything is changed;
    ``model`` is not mutated unless ``inplace=True``.
    """
    return method_for(config).apply(model, inplace=inplace, example_inputs=example_inputs,
                                    example_kwargs=example_kwargs)


# ------------------------------------------------------------------------------------------ TREAD


@register_method
class TreadMethod(Method):
    """TREAD token routing: the model's class gains a routed forward for training; eval is the original.

    ``plan`` resolves the config against the module tree; ``rewrite``
    attaches the routed runtime (:mod:`treadfx.transformed`), which builds a
    routed graph per input signature with :func:`treadfx.pipeline.build`;
    the kept indices each graph returns after the user's outputs are recorded
    for ``last_routes`` and ``route_loss``.
    """

    config_class = TreadConfig
    entry_point = "transform"

    def check_model(self, model: nn.Module) -> None:
        """Refuse non-modules, wrappers, and models that are (or contain) transformed models."""
        if isinstance(model, nn.Module) and is_transformed(unwrap(model)):
            raise TransformError(
                "this model is already transformed by treadfx. Fix: transform the original model, or change routing "
                "with treadfx.set_ratio / force_routing."
            )
        if isinstance(model, nn.Module):
            nested = next((name for name, sub in model.named_modules() if name and is_transformed(sub)), None)
            if nested is not None:
                raise LiveModelError(
                    f"`{nested}` inside this {type(model).__name__} is already a treadfx-transformed model; "
                    "transforming the outer module would route twice. Fix: transform only one of them (usually the "
                    f"backbone), or pass the original module instead of `{nested}`."
                )
        super().check_model(model)

    def plan(self, model, example_inputs, example_kwargs) -> TransformConfig:
        """The resolved config (route indices checked against the model's block candidates)."""
        return self.config.resolve(model)[0]

    def copy(self, model: nn.Module) -> nn.Module:
        """A new module tree sharing the parameter and buffer objects (:func:`clone_module_tree`)."""
        return clone_module_tree(model)

    def rewrite(self, target, plan):
        """Attach the routed runtime to ``target`` (its own block candidates: a copy has new module objects)."""
        return attach(target, plan, method=self)

    def finish(self, model, example_inputs, example_kwargs):
        """Trace and rewrite now for ``example_inputs`` (in the model's current mode), like ``treadfx.prepare``."""
        if example_inputs is not None:
            prepare_now(model, tuple(example_inputs), dict(example_kwargs or {}))

    def runtime_outputs(self, state, program, extra):
        """The extra outputs are each route's kept indices: remember them as this thread's last routes."""
        state.record(program, list(extra))

    def report_section(self, inspection):
        """The routes as planned, the pixel->token map and the side exits (:func:`treadfx.report.tread_section`)."""
        return tread_section(inspection)

    def plan_graph(self, laid):
        """A plan per route, with the order probe (:func:`treadfx.pipeline.plan_tread_routes`)."""
        return plan_tread_routes(laid)

    def rewrite_graph(self, planned):
        """The TREAD pass on the traced graph (:func:`treadfx.pipeline.insert_routes`)."""
        return insert_routes(planned)

    @classmethod
    def found_in(cls, model):
        """The method of a transformed model's routed runtime (also for models rebuilt by unpickling)."""
        m = state_of(model).method if is_transformed(model) else None
        return m if type(m) is cls else None


# ------------------------------------------------------------------------------------------ DiffMoE


@register_method
class DiffMoEMethod(Method):
    """DiffMoE as a :class:`Method`: an adapter over :class:`treadfx.passes.diffmoe.DiffMoEPass`.

    ``plan`` finds the FFN of every block to convert (``DiffMoEPass.analyse``,
    with ``example_inputs`` when given); ``rewrite`` swaps in DiffMoE layers
    (``DiffMoEPass.apply``), clears the traced programs of a TREAD-transformed
    model so they are rebuilt with the new layers, and keeps the FFN matches
    in ``model._treadfx_diffmoe_matches``.  The layers keep their own
    statistics, so a rewritten graph returns no extra outputs for DiffMoE.
    """

    config_class = DiffMoEConfig
    entry_point = "diffmoe"

    def __init__(self, config: DiffMoEConfig):
        super().__init__(config)
        self._pass: DiffMoEPass | None = None

    def plan(self, model, example_inputs, example_kwargs) -> list[FFNMatch]:
        self._pass = DiffMoEPass(self.config)  # validates
        if diffmoe_layers(model):
            raise TransformError(
                f"{type(model).__name__} already has DiffMoE layers. Fix: convert the original dense model once."
            )
        return self._pass.analyse(model, example_inputs, example_kwargs)

    def rewrite(self, target, plan):
        if self._pass is None:
            self._pass = DiffMoEPass(self.config)
        self._pass.matches = list(plan)  # same module paths in the copy
        self._pass.apply(target)
        if is_transformed(target):  # traced TREAD programs ran the old FFNs' fake shapes: rebuild lazily
            st = state_of(target)
            st.programs.clear()
            st.current = None
            st.record(None, [])
        target.__dict__["_treadfx_diffmoe_matches"] = list(plan)
        return target

    def report_section(self, inspection):
        """The DiffMoE statistics of a training step and the static-capacity inference check
        (:func:`treadfx.report.diffmoe_section`)."""
        return diffmoe_section(inspection)

    @classmethod
    def found_in(cls, model):
        """The recorded DiffMoE method, or one with the default config for a model whose DiffMoE layers were
        inserted by hand (the report reads the layers, not the config)."""
        return super().found_in(model) or (cls(DiffMoEConfig()) if diffmoe_layers(model) else None)
