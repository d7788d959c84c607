"""One aggregation pipeline, in the spirit of optax's ``chain``: pre-stages, one reduction, post-stages.

    pipeline(pre=[clip(1.0), screen()], reduce=krum(f=2))
    pipeline(pre=[clip(C)], reduce=total(), post=[gaussian_noise(z * C, C), scale(1 / (q * N))])

Pre-stages either map each update as it arrives (``clip``: streamed, O(model) memory) or select
among the whole round's updates (``screen``: the pipeline then buffers). Post-stages transform the
reduced vector (noise, a fixed scale). The pipeline's :class:`Properties` follow from its stages', and
a combination that cannot be honoured is refused here, with the reason, before any round runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from insitu.aggregation.base import (
    AggregationAssumptionError,
    EmptyAggregationError,
    Properties,
    Reducer,
    Report,
    check_update,
    check_weight,
)
from insitu.aggregation.clip import Clip
from insitu.aggregation.screen import Screen


class MapStage(Protocol):
    """A pre-stage applied to each update on arrival (``properties.needs_individual`` is False)."""

    properties: Properties

    def apply(self, update: np.ndarray) -> tuple[np.ndarray, Report]:
        """The transformed update and its per-update metrics (summed over the round)."""


class FilterStage(Protocol):
    """A pre-stage that sees the whole round (``properties.needs_individual`` is True)."""

    properties: Properties

    def select(self, updates: list[np.ndarray]) -> tuple[np.ndarray, Report]:
        """The boolean mask of updates kept, and its report."""


class PostStage(Protocol):
    """A stage applied to the reduced vector."""

    properties: Properties

    def output_sensitivity(self, before: float | None, source: str) -> float | None:
        """The per-client sensitivity after this stage; ValueError if it cannot follow ``source``."""

    def apply(self, vector: np.ndarray) -> np.ndarray:
        """The transformed vector (float32; may be ``vector`` itself, changed in place)."""


PreStage = MapStage | FilterStage


@dataclass
class PipelineState:
    """One round's accumulator: the reduction's, the summed per-update metrics, and (when a filter
    must see the whole round) the buffered updates and weights."""

    dim: int
    inner: Any
    counts: Report
    buffer: list[np.ndarray] | None = None
    weights: list[float] = field(default_factory=list)


class Pipeline:
    """Pre-stages, one reduction, post-stages; itself a :class:`Reducer` (start/add/finish)."""

    def __init__(self, pre: Sequence[PreStage], reduce: Reducer, post: Sequence[PostStage] = ()) -> None:
        self.pre, self.reduce, self.post = tuple(pre), reduce, tuple(post)
        split = next((i for i, s in enumerate(self.pre) if s.properties.needs_individual), len(self.pre))
        self._streamed = [cast(MapStage, s) for s in self.pre[:split]]
        self._deferred = self.pre[split:]  # from the first filter on: run at finish, over the buffered round
        self.properties = self._compose()

    def _compose(self) -> Properties:
        """The pipeline's properties from its stages'; ValueError naming an impossible combination."""
        r = self.reduce.properties
        for stage in self.pre:
            if r.hides_inputs and stage.properties.needs_individual:
                raise ValueError(f"secure aggregation reveals only the sum: {stage!r} needs individual updates, "
                                 f"which {self.reduce!r} never shows the server; drop it")
        # the last per-update map's bound holds, unless a filter ran (who it drops depends on the others)
        sensitivity = self.pre[-1].properties.sensitivity if self.pre and not self._deferred else None
        if r.sensitivity is not None:
            sensitivity = r.sensitivity
        elif not (r.linear and not r.uses_weights):  # only a plain sum passes one client's bound through
            sensitivity = None
        source = " -> ".join(map(repr, [*self.pre, self.reduce]))
        for post in self.post:
            sensitivity = post.output_sensitivity(sensitivity, source)
            source = f"{source} -> {post!r}"
        stages = [*self.pre, self.reduce, *self.post]
        return Properties(
            linear=r.linear and not self.pre and all(p.properties.linear for p in self.post),
            needs_individual=r.needs_individual or bool(self._deferred),
            uses_weights=r.uses_weights,
            shift_equivariant=r.shift_equivariant and not self.pre and not self.post,
            min_updates=r.min_updates,
            sensitivity=sensitivity,
            metrics=tuple(dict.fromkeys(m for s in stages for m in s.properties.metrics)),
            hides_inputs=r.hides_inputs,
        )

    def start(self, dim: int) -> PipelineState:
        counts: Report = {m: 0 for s in self.pre if not s.properties.needs_individual for m in s.properties.metrics}
        if self._deferred:
            return PipelineState(dim, None, counts, buffer=[])
        return PipelineState(dim, self.reduce.start(dim), counts)

    def add(self, acc: PipelineState, update: np.ndarray, weight: float) -> PipelineState:
        for stage in self._streamed:
            update = self._map(stage, update, acc.counts)
        if acc.buffer is None:
            acc.inner = self.reduce.add(acc.inner, update, weight)
        else:
            check_weight(weight)
            acc.buffer.append(check_update(update, acc.dim))
            acc.weights.append(float(weight))
        return acc

    def finish(self, acc: PipelineState) -> tuple[np.ndarray, Report]:
        report = dict(acc.counts)
        rejected, seen = 0, 0
        if acc.buffer is not None:
            updates, weights, seen = acc.buffer, acc.weights, len(acc.buffer)
            for stage in self._deferred if updates else ():
                if stage.properties.needs_individual:
                    keep, stage_report = cast(FilterStage, stage).select(updates)
                    report.update(stage_report)
                    updates = [u for u, k in zip(updates, keep) if k]
                    weights = [w for w, k in zip(weights, keep) if k]
                    if not updates:
                        raise EmptyAggregationError(f"{stage!r} rejected all {seen} updates (see the warnings above)")
                else:
                    updates = [self._map(cast(MapStage, stage), u, report) for u in updates]
            rejected = seen - len(updates)
            acc.inner = self.reduce.start(acc.dim)
            for update, weight in zip(updates, weights):
                acc.inner = self.reduce.add(acc.inner, update, weight)
            acc.buffer.clear()
            del updates
        try:
            vector, reduce_report = self.reduce.finish(acc.inner)
        except AggregationAssumptionError as exc:
            if not rejected:
                raise
            raise AggregationAssumptionError(f"after screening rejected {rejected} of {seen} updates: {exc}") from exc
        report.update(reduce_report)
        return self.finish_post(vector, report)

    def finish_post(self, vector: np.ndarray, report: Report) -> tuple[np.ndarray, Report]:
        """Run the post-stages on a reduced vector (also how a round decoded elsewhere is finished)."""
        for post in self.post:
            vector = post.apply(vector)
        return vector, report

    @staticmethod
    def _map(stage: MapStage, update: np.ndarray, counts: Report) -> np.ndarray:
        update, stage_report = stage.apply(update)
        for key, value in stage_report.items():
            counts[key] = counts.get(key, 0) + value
        return update

    def __repr__(self) -> str:
        parts = [f"pre=[{', '.join(map(repr, self.pre))}]"] if self.pre else []
        parts.append(f"reduce={self.reduce!r}")
        if self.post:
            parts.append(f"post=[{', '.join(map(repr, self.post))}]")
        return f"pipeline({', '.join(parts)})"


def pipeline(*, pre: Sequence[PreStage] = (), reduce: Reducer, post: Sequence[PostStage] = ()) -> Pipeline:
    """Compose pre-stages, one reduction and post-stages; refuses combinations it cannot honour."""
    return Pipeline(pre, reduce, post)


def _prepend(stage: PreStage, inner: Reducer) -> Pipeline:
    if isinstance(inner, Pipeline):
        return Pipeline((stage, *inner.pre), inner.reduce, inner.post)
    return Pipeline((stage,), inner)


def clipped(inner: Reducer, max_norm: float) -> Pipeline:
    """``inner`` with every update first clipped to L2 norm <= ``max_norm``."""
    return _prepend(Clip(max_norm), inner)


def screened(inner: Reducer, max_norm_ratio: float = 10.0) -> Pipeline:
    """``inner`` with non-finite and oversized (> ratio x median norm) updates dropped first."""
    return _prepend(Screen(max_norm_ratio), inner)
