"""The method plug-in kind: :class:`Method` entries in the :data:`METHODS` registry (see the package doc)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from orchestrator.registry import Registry


@dataclass
class MethodResult:
    """What a method's training returns: the final ``student`` (nn.Module, (B, C, H, W) float32 -> (B, K)
    logits) and its ``preprocess``; ``model_id``/``model_kwargs`` of the student's architecture; ``metrics``:
    intermediate test top-1s (e.g. ``distilled_top1``)."""

    student: object
    preprocess: object
    model_id: str
    model_kwargs: dict
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: the ``method:`` value. train: ``fn(ctx) -> MethodResult`` (runs its stages through the graph).
        summary: one line for ``kt methods`` and tables. source: the paper and section it comes from.
        role: the final student's row label. uses_teacher: needs the adapted teacher (a sweep prepares it).
        transfer_stages: the recorded stages whose compute counts as *transfer compute* (what the method spends
            beyond training a student on the labels, as paper 1 accounts pretraining compute).
        needs_sources: distils from a source zoo (``sources.zoo`` or ``sources.demo``); ``kt compare`` leaves
            such methods out of its default list when the task configures no zoo.
        checks: the method's own cheap preflight checks, each ``fn(cfg)`` raising a clear error before any heavy
            work (run by :meth:`check`, which :func:`orchestrator.methods.preflight.preflight` calls).
    """

    name: str
    train: Callable
    summary: str
    source: str
    role: str
    uses_teacher: bool
    transfer_stages: tuple[str, ...]
    needs_sources: bool = False
    checks: tuple[Callable, ...] = ()

    def check(self, cfg) -> None:
        """Run this method's preflight checks on ``cfg`` (a PipelineConfig); raises what they raise."""
        for fn in self.checks:
            fn(cfg)

    def applicable(self, cfg) -> bool:
        """Whether ``cfg`` (a PipelineConfig) supplies what this method needs (a source zoo, if it needs one)."""
        return not self.needs_sources or bool(cfg.sources.demo or cfg.sources.zoo)


METHODS: Registry[Method] = Registry("method")
# builders of offline demo material the core asks for by name, registered by the demo package as entry points
# (pyproject.toml, group kt.builders): "standin" (the SimCLR stand-in teacher), "demo_zoo" (paper 2's demo zoo)
BUILDERS: Registry[Callable] = Registry("demo builder", group="kt.builders")


def register(method: Method) -> Method:
    """Register ``method`` under its name (ValueError on a duplicate)."""
    return METHODS.register(method.name)(method)
