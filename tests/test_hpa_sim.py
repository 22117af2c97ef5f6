"""The HPA model (lotcast.ops.hpa) and the scaling simulation (lotcast.ops.hpa_sim)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lotcast.ops.hpa import (
    HorizontalPodAutoscaler,
    HpaSpec,
    MetricTarget,
    ScalingPolicy,
    ScalingRules,
    parse_quantity,
)
from lotcast.ops.hpa_sim import (
    RelayModel,
    flaps,
    load_curve,
    main,
    reversals,
    simulate,
)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
LOAD = "lotcast_relay_load_ratio"
FREE = ScalingRules(0, "Max", (ScalingPolicy("Percent", 1000, 15),))


def hpa(**kw: object) -> HorizontalPodAutoscaler:
    base: dict[str, object] = {"min_replicas": 1, "max_replicas": 100,
                               "metrics": (MetricTarget(LOAD, 0.5),),
                               "scale_up": FREE,
                               "scale_down": ScalingRules(0, "Max", FREE.policies)}
    base.update(kw)
    return HorizontalPodAutoscaler(HpaSpec(**base))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("current", "values", "unready", "expected"),
    [
        (4, [0.5] * 4, 0, 4),  # on target
        (4, [0.54] * 4, 0, 4),  # within tolerance (ratio 1.08)
        (4, [0.56] * 4, 0, 5),  # ceil(4 * 1.12)
        (4, [1.0] * 4, 0, 8),  # double the load, double the pods
        (4, [0.1] * 4, 0, 1),  # ceil(4 * 0.2)
        (4, [0.4] * 4, 0, 4),  # ratio 0.8 -> ceil(3.2) = 4
        (3, [1.0] * 2, 1, 4),  # the starting pod counts as 0: ceil(3 * 0.667 / 0.5)
        (3, [0.52] * 2, 1, 3),  # with the unready pod at 0 it's below target: no scale-up
        (4, [], 0, 4),  # no metrics, no change
    ],
)
def test_proposal_formula(current: int, values: list[float], unready: int,
                          expected: int) -> None:
    assert hpa().reconcile(0, current, {LOAD: values}, unready) == expected


def test_largest_metric_wins_and_bounds_apply() -> None:
    two = hpa(metrics=(MetricTarget(LOAD, 0.5), MetricTarget("cpu", 0.5)), max_replicas=10)
    assert two.reconcile(0, 4, {LOAD: [0.5] * 4, "cpu": [1.0] * 4}) == 8
    assert two.reconcile(15, 8, {LOAD: [2.0] * 8, "cpu": [0.1] * 8}) == 10  # maxReplicas
    floor = hpa(min_replicas=3)
    assert floor.reconcile(0, 4, {LOAD: [0.0] * 4}) == 3


def test_scale_down_stabilisation_window_holds_the_highest_recommendation() -> None:
    h = hpa(scale_down=ScalingRules(300, "Max", FREE.policies))
    assert h.reconcile(0, 4, {LOAD: [1.0] * 4}) == 8
    # Load falls right away: the 8 recommended at t=0 holds for 300 s.
    for t in range(15, 300, 15):
        assert h.reconcile(t, 8, {LOAD: [0.25] * 8}) == 8, t
    assert h.reconcile(300, 8, {LOAD: [0.25] * 8}) == 8  # t=0 is still inside (<= window)
    assert h.reconcile(315, 8, {LOAD: [0.25] * 8}) == 4


def test_scale_up_and_down_rate_policies() -> None:
    up = ScalingRules(0, "Max",
                      (ScalingPolicy("Pods", 4, 60), ScalingPolicy("Percent", 100, 60)))
    h = hpa(scale_up=up, scale_down=ScalingRules(0, "Min", (ScalingPolicy("Pods", 1, 60),)))
    assert h.reconcile(0, 2, {LOAD: [5.0] * 2}) == 6  # max(2 + 4, 2 * 2)
    assert h.reconcile(15, 6, {LOAD: [5.0] * 6}) == 6  # the 60 s budget is spent
    assert h.reconcile(60, 6, {LOAD: [5.0] * 6}) == 12  # a new period: max(6 + 4, 6 * 2)
    # Scale-down policies count from the replicas at the period start, net of scale-ups in it
    # (as the controller does): 12 now, 6 a minute ago -> at most 6 - 1.
    assert h.reconcile(75, 12, {LOAD: [0.01] * 12}) == 5
    down = hpa(scale_down=ScalingRules(0, "Min", (ScalingPolicy("Pods", 1, 60),)))
    assert down.reconcile(0, 12, {LOAD: [0.01] * 12}) == 11  # one pod per minute down
    assert down.reconcile(15, 11, {LOAD: [0.01] * 11}) == 11
    assert down.reconcile(60, 11, {LOAD: [0.01] * 11}) == 10
    disabled = hpa(scale_down=ScalingRules(0, "Disabled"))
    assert disabled.reconcile(0, 5, {LOAD: [0.0] * 5}) == 5


def test_spec_matches_the_manifests() -> None:
    """The simulation's defaults are the numbers k8s/ deploys (prod overlay)."""
    doc = yaml.safe_load((REPO / "k8s/base/relay-hpa.yaml").read_text())
    assert HpaSpec.from_manifest(doc) == HpaSpec()
    assert parse_quantity("700m") == pytest.approx(0.7)
    prod = (REPO / "k8s/overlays/prod/kustomization.yaml").read_text()
    model = RelayModel()
    assert f"LOTCAST_MAX_VIEWERS={model.capacity}" in prod
    assert f"LOTCAST_DRAIN_TIMEOUT={model.drain_timeout}" in prod
    grace = re.search(r"terminationGracePeriodSeconds\n\s+value: (\d+)", prod)
    assert grace and int(grace.group(1)) == model.grace_period > model.drain_timeout
    relay = yaml.safe_load((REPO / "k8s/base/relay-deployment.yaml").read_text())
    cpu = relay["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    assert parse_quantity(cpu) * 1000 == model.cpu_request_millicores


def test_ramp_to_10k_and_back_without_flapping_or_drops() -> None:
    spec = HpaSpec()
    result = simulate(spec)
    window = spec.scale_down.stabilization_window_seconds
    assert result.peak_viewers >= 10_000
    assert flaps(result.scale_events, window) == []
    assert reversals(result.scale_events, window) == []
    assert result.dropped == 0
    # Enough relays at the peak for the target load, never above maxReplicas, back to min.
    assert 10_000 / RelayModel().capacity < result.max_replicas <= spec.max_replicas
    assert result.replicas[-1][1] == spec.min_replicas
    # Every scale-down drained a relay within the drain timeout.
    assert result.drains and all(d < RelayModel().drain_timeout for _, d, _ in result.drains)
    assert any(v > 0 for _, _, v in result.drains)  # some drains really moved viewers
    # Scale-up keeps up: viewers without a relay are a tiny fraction of viewer-seconds.
    assert result.waiting_viewer_seconds < 0.001 * 10_000 * 35 * 60


def test_detectors_catch_flapping_and_drops() -> None:
    """Negative controls: without a stabilisation window a wobbling load flaps; a drain far
    shorter than the viewers' reconnect time drops viewers."""
    no_window = HpaSpec(scale_down=ScalingRules(0, "Max", (ScalingPolicy("Percent", 100, 15),)),
                        tolerance=0.0)

    def wobble(t: int) -> int:
        return 3000 + (600 if (t // 45) % 2 else -600)

    flappy = simulate(no_window, curve=wobble, duration=30 * 60)
    assert flaps(flappy.scale_events, 300)
    rushed = simulate(HpaSpec(), RelayModel(drain_timeout=2, reconnect_spread=30),
                      duration=80 * 60)
    assert rushed.dropped > 0


def test_curve_shape() -> None:
    curve = load_curve(10_000, seed=3)
    assert curve(0) == 0
    assert 9_500 <= curve(30 * 60) <= 10_500
    assert curve(70 * 60) == 0


def test_cli_prints_replicas_and_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--manifest", str(REPO / "k8s/base/relay-hpa.yaml")]) == 0
    out = capsys.readouterr().out
    assert "replicas" in out
    assert "flaps within 300s: 0" in out
    assert "viewers dropped on scale-down: 0" in out
