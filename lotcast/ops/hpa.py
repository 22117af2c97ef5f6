"""A pure-Python model of the Kubernetes HorizontalPodAutoscaler (autoscaling/v2) decision.

Follows the controller's algorithm (pkg/controller/podautoscaler): per metric
`desired = ceil(current * metric / target)` unless the ratio is within the tolerance (0.1),
unready pods counted as 0 when scaling up; the largest proposal wins; then the behavior's
stabilisation windows (scale-up: lowest recommendation in the window, scale-down: highest) and
rate-limit policies (Pods / Percent per period, selectPolicy Max / Min / Disabled); then
min/maxReplicas. Time is an argument (seconds), so it is deterministic and testable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

PolicyType = Literal["Pods", "Percent"]
SelectPolicy = Literal["Max", "Min", "Disabled"]
DEFAULT_TOLERANCE = 0.1


@dataclass(frozen=True)
class ScalingPolicy:
    type: PolicyType
    value: int
    period_seconds: int


@dataclass(frozen=True)
class ScalingRules:
    stabilization_window_seconds: int
    select_policy: SelectPolicy = "Max"
    policies: tuple[ScalingPolicy, ...] = ()


@dataclass(frozen=True)
class MetricTarget:
    """A per-pod average target: `lotcast_relay_load_ratio` 0.7, or CPU utilisation 0.75."""

    name: str
    target: float


@dataclass(frozen=True)
class HpaSpec:
    min_replicas: int = 2
    max_replicas: int = 40
    metrics: tuple[MetricTarget, ...] = (
        MetricTarget("lotcast_relay_load_ratio", 0.7),
        MetricTarget("cpu", 0.75),
    )
    scale_up: ScalingRules = ScalingRules(
        0, "Max", (ScalingPolicy("Pods", 4, 60), ScalingPolicy("Percent", 100, 60))
    )
    scale_down: ScalingRules = ScalingRules(300, "Min", (ScalingPolicy("Pods", 1, 60),))
    tolerance: float = DEFAULT_TOLERANCE
    sync_period_seconds: int = 15

    @classmethod
    def from_manifest(cls, doc: Mapping[str, Any]) -> HpaSpec:
        """Read an autoscaling/v2 HorizontalPodAutoscaler (as parsed YAML)."""
        spec = doc["spec"]
        metrics: list[MetricTarget] = []
        for m in spec["metrics"]:
            if m["type"] == "Pods":
                metrics.append(MetricTarget(m["pods"]["metric"]["name"],
                                            parse_quantity(m["pods"]["target"]["averageValue"])))
            elif m["type"] == "Resource":
                target = m["resource"]["target"]
                metrics.append(MetricTarget(m["resource"]["name"],
                                            target["averageUtilization"] / 100))
            else:
                raise ValueError(f"unsupported metric type {m['type']!r}")
        behavior = spec.get("behavior", {})
        return cls(
            min_replicas=int(spec.get("minReplicas", 1)),
            max_replicas=int(spec["maxReplicas"]),
            metrics=tuple(metrics),
            scale_up=_rules(behavior.get("scaleUp"), cls.scale_up),
            scale_down=_rules(behavior.get("scaleDown"), cls.scale_down),
        )


def _rules(raw: Mapping[str, Any] | None, default: ScalingRules) -> ScalingRules:
    if raw is None:
        return default
    return ScalingRules(
        stabilization_window_seconds=int(
            raw.get("stabilizationWindowSeconds", default.stabilization_window_seconds)),
        select_policy=raw.get("selectPolicy", "Max"),
        policies=tuple(ScalingPolicy(p["type"], int(p["value"]), int(p["periodSeconds"]))
                       for p in raw.get("policies", [])) or default.policies,
    )


def parse_quantity(value: str | int | float) -> float:
    """Kubernetes quantity to float: "700m" -> 0.7, "2" -> 2.0."""
    if isinstance(value, int | float):
        return float(value)
    if value.endswith("m"):
        return float(value[:-1]) / 1000
    return float(value)


@dataclass
class HorizontalPodAutoscaler:
    """One HPA's controller state: past recommendations and past scale events."""

    spec: HpaSpec
    _recommendations: list[tuple[float, int]] = field(default_factory=list)
    _events: list[tuple[float, int]] = field(default_factory=list)

    def proposal(
        self, current: int, ready_values: Mapping[str, Sequence[float]], unready: int
    ) -> int:
        """Replicas proposed by the metrics alone (largest over metrics)."""
        best = 0
        for metric in self.spec.metrics:
            values = list(ready_values.get(metric.name, ()))
            best = max(best, self._metric_proposal(current, values, unready, metric.target))
        return best

    def _metric_proposal(self, current: int, values: list[float], unready: int,
                         target: float) -> int:
        if not values:
            return current
        ratio = sum(values) / len(values) / target
        if abs(ratio - 1) <= self.spec.tolerance:
            return current
        if ratio > 1 and unready:
            # Pods still starting count as 0: don't scale up again for load they will absorb.
            values = values + [0.0] * unready
            new_ratio = sum(values) / len(values) / target
            if abs(new_ratio - 1) <= self.spec.tolerance or new_ratio < 1:
                return current
            ratio = new_ratio
        return math.ceil(ratio * len(values))

    def reconcile(
        self,
        now: float,
        current: int,
        ready_values: Mapping[str, Sequence[float]],
        unready: int = 0,
    ) -> int:
        """The replica count the HPA sets at time `now` (seconds)."""
        proposal = self.proposal(current, ready_values, unready)
        stabilized = self._stabilize(now, current, proposal)
        desired = self._rate_limit(now, current, stabilized)
        desired = max(self.spec.min_replicas, min(self.spec.max_replicas, desired))
        if desired != current:
            self._events.append((now, desired - current))
        return desired

    def _stabilize(self, now: float, current: int, proposal: int) -> int:
        self._recommendations.append((now, proposal))
        up_window = self.spec.scale_up.stabilization_window_seconds
        down_window = self.spec.scale_down.stabilization_window_seconds
        horizon = max(up_window, down_window)
        self._recommendations = [(t, r) for t, r in self._recommendations if now - t <= horizon]
        up = min([r for t, r in self._recommendations if now - t <= up_window] or [proposal])
        down = max([r for t, r in self._recommendations if now - t <= down_window] or [proposal])
        result = current
        if result < up:
            result = up
        if result > down:
            result = down
        return result

    def _changes_in(self, now: float, period: int) -> tuple[int, int]:
        added = sum(d for t, d in self._events if d > 0 and now - t < period)
        deleted = sum(-d for t, d in self._events if d < 0 and now - t < period)
        return added, deleted

    def _rate_limit(self, now: float, current: int, desired: int) -> int:
        if desired > current:
            rules = self.spec.scale_up
            if rules.select_policy == "Disabled":
                return current
            limits = []
            for p in rules.policies:
                added, deleted = self._changes_in(now, p.period_seconds)
                start = current - added + deleted
                limits.append(start + p.value if p.type == "Pods"
                              else math.ceil(start * (1 + p.value / 100)))
            limit = (max if rules.select_policy == "Max" else min)(limits) if limits else desired
            return min(desired, max(limit, current))
        if desired < current:
            rules = self.spec.scale_down
            if rules.select_policy == "Disabled":
                return current
            limits = []
            for p in rules.policies:
                added, deleted = self._changes_in(now, p.period_seconds)
                start = current + deleted - added
                limits.append(start - p.value if p.type == "Pods"
                              else math.floor(start * (1 - p.value / 100)))
            # Max = the policy allowing the biggest change (lowest floor).
            limit = (min if rules.select_policy == "Max" else max)(limits) if limits else desired
            return max(desired, min(limit, current))
        return current
