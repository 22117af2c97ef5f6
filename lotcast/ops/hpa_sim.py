"""Scaling simulation: the relay HPA (lotcast.ops.hpa) plus relay start-up and drain timing, driven
by a viewer-load curve that ramps up to 10,000 viewers and back down.

Per simulated second: viewers arrive (placed on the least-loaded ready relay with room, as
`RelaySelector` does) or leave; starting relays become ready; draining relays hand their viewers
over (each viewer re-places within `reconnect_spread` seconds, as the viewer page does on a
reconnect event) and exit when empty, or drop whoever is left when the drain timeout expires.
Every HPA sync period the HPA sees the ready relays' load ratio and CPU and sets the replica count;
scale-down picks the most recently ready relay (the ReplicaSet default) and drains it.

    python -m lotcast.ops.hpa_sim [--peak 10000] [--manifest k8s/base/relay-hpa.yaml]

prints the replica count over time and a summary: flaps and viewers dropped (both should be 0).
"""

from __future__ import annotations

import argparse
import enum
import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lotcast.ops.hpa import HorizontalPodAutoscaler, HpaSpec


class RelayPhase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    GONE = "gone"


_PHASES: dict[RelayPhase, frozenset[RelayPhase]] = {
    RelayPhase.STARTING: frozenset({RelayPhase.SERVING, RelayPhase.DRAINING}),
    RelayPhase.SERVING: frozenset({RelayPhase.DRAINING}),
    RelayPhase.DRAINING: frozenset({RelayPhase.GONE}),
    RelayPhase.GONE: frozenset(),
}


@dataclass(frozen=True)
class RelayModel:
    capacity: int = 500  # LOTCAST_MAX_VIEWERS in k8s/overlays/prod
    cpu_request_millicores: float = 2000  # k8s/base/relay-deployment.yaml
    cpu_base_millicores: float = 50
    # DESIGN.md target: at most half of Janus's 5.5 ms CPU per viewer-second.
    cpu_per_viewer_millicores: float = 2.75
    startup_seconds: int = 20  # scheduled, image present, readiness passing
    drain_timeout: int = 300  # LOTCAST_DRAIN_TIMEOUT in prod
    grace_period: int = 360  # terminationGracePeriodSeconds in prod
    reconnect_spread: int = 5  # seconds over which a draining relay's viewers re-place


@dataclass
class SimRelay:
    relay_id: int
    phase: RelayPhase
    ready_at: int
    viewers: int = 0
    drain_started: int = 0
    drain_initial: int = 0

    def set_phase(self, new: RelayPhase) -> None:
        if new not in _PHASES[self.phase]:
            raise RuntimeError(f'relay {self.relay_id}: cannot go to "{new.value}" from '
                               f'"{self.phase.value}"')
        self.phase = new


@dataclass
class SimResult:
    # (t, replicas counted by the Deployment) after every HPA sync.
    replicas: list[tuple[int, int]] = field(default_factory=list)
    # (t, signed change) for every HPA scale event.
    scale_events: list[tuple[int, int]] = field(default_factory=list)
    dropped: int = 0  # viewers cut off by a drain timeout
    waiting_viewer_seconds: int = 0  # viewers that found no relay with room (503) per second
    drains: list[tuple[int, int, int]] = field(default_factory=list)  # (start, seconds, viewers)
    peak_viewers: int = 0
    rows: list[str] = field(default_factory=list)

    @property
    def max_replicas(self) -> int:
        return max(r for _, r in self.replicas)


def load_curve(peak: int = 10_000, seed: int = 1) -> Callable[[int], int]:
    """Viewers wanting to watch at second t: idle 5 min, ramp to `peak` over 20 min, 15 min
    plateau with +-3 % wobble, ramp down over 20 min, then 0 (t in seconds, 0..6600)."""
    rng = random.Random(seed)
    phases = [rng.uniform(0, 2 * math.pi) for _ in range(3)]

    def viewers(t: int) -> int:
        m = t / 60
        if m < 5:
            base = 0.0
        elif m < 25:
            base = (m - 5) / 20
        elif m < 40:
            base = 1.0
        elif m < 60:
            base = 1 - (m - 40) / 20
        else:
            base = 0.0
        wobble = 1 + 0.03 * sum(math.sin(t / p + ph) for p, ph in
                                zip((97.0, 233.0, 411.0), phases, strict=True)) / 3
        return max(0, round(peak * base * wobble))

    return viewers


class RelayFleet:
    """The relays of one Deployment and the viewers on them."""

    def __init__(self, model: RelayModel, initial: int) -> None:
        self.model = model
        self.relays: list[SimRelay] = []
        self.waiting = 0
        self._next_id = 0
        self.add(initial, now=-model.startup_seconds)

    def add(self, n: int, now: int) -> None:
        for _ in range(n):
            self.relays.append(SimRelay(self._next_id, RelayPhase.STARTING,
                                        now + self.model.startup_seconds))
            self._next_id += 1

    def of(self, *phases: RelayPhase) -> list[SimRelay]:
        return [r for r in self.relays if r.phase in phases]

    @property
    def replicas(self) -> int:
        """What the Deployment counts: terminating (draining) pods are not replicas."""
        return len(self.of(RelayPhase.STARTING, RelayPhase.SERVING))

    @property
    def viewers(self) -> int:
        return sum(r.viewers for r in self.relays) + self.waiting

    def place(self, n: int) -> int:
        """Place n viewers on the least-loaded serving relays with room; returns how many fit."""
        heap = [(r.viewers / self.model.capacity, r.relay_id, r)
                for r in self.of(RelayPhase.SERVING) if r.viewers < self.model.capacity]
        heapq.heapify(heap)
        placed = 0
        while placed < n and heap:
            _, _, relay = heapq.heappop(heap)
            relay.viewers += 1
            placed += 1
            if relay.viewers < self.model.capacity:
                heapq.heappush(heap, (relay.viewers / self.model.capacity, relay.relay_id, relay))
        return placed

    def leave(self, n: int, rng: random.Random) -> None:
        """n viewers stop watching, uniformly over everyone watching or waiting."""
        for _ in range(n):
            pick = rng.randrange(self.viewers)
            if pick < self.waiting:
                self.waiting -= 1
                continue
            pick -= self.waiting
            for r in self.relays:
                if pick < r.viewers:
                    r.viewers -= 1
                    break
                pick -= r.viewers

    def scale_to(self, desired: int, now: int) -> None:
        current = self.replicas
        if desired > current:
            self.add(desired - current, now)
        for _ in range(current - desired):
            # ReplicaSet victim order: not-ready pods first, then the most recently ready.
            victim = max(self.of(RelayPhase.STARTING, RelayPhase.SERVING),
                         key=lambda r: (r.phase is RelayPhase.STARTING, r.ready_at))
            victim.set_phase(RelayPhase.DRAINING)
            victim.drain_started, victim.drain_initial = now, victim.viewers

    def tick(self, now: int, result: SimResult) -> None:
        for r in self.of(RelayPhase.STARTING):
            if now >= r.ready_at:
                r.set_phase(RelayPhase.SERVING)
        for r in self.of(RelayPhase.DRAINING):
            elapsed = now - r.drain_started
            if r.viewers and elapsed < self.model.drain_timeout:
                per_second = math.ceil(r.drain_initial / self.model.reconnect_spread)
                moving = min(r.viewers, per_second * (elapsed + 1) -
                             (r.drain_initial - r.viewers))
                if moving > 0:
                    r.viewers -= self.place(moving)
            if r.viewers == 0 or elapsed >= self.model.drain_timeout:
                result.dropped += r.viewers
                result.drains.append((r.drain_started, elapsed, r.drain_initial))
                r.viewers = 0
                r.set_phase(RelayPhase.GONE)
        self.relays = [r for r in self.relays if r.phase is not RelayPhase.GONE]
        if self.waiting:
            self.waiting -= self.place(self.waiting)

    def metrics(self) -> tuple[dict[str, list[float]], int]:
        ready = self.of(RelayPhase.SERVING)
        m = self.model
        values = {
            "lotcast_relay_load_ratio": [r.viewers / m.capacity for r in ready],
            "cpu": [(m.cpu_base_millicores + m.cpu_per_viewer_millicores * r.viewers)
                    / m.cpu_request_millicores for r in ready],
        }
        return values, len(self.of(RelayPhase.STARTING))


def simulate(
    spec: HpaSpec | None = None,
    model: RelayModel | None = None,
    curve: Callable[[int], int] | None = None,
    duration: int = 110 * 60,
    seed: int = 1,
) -> SimResult:
    spec = spec or HpaSpec()
    model = model or RelayModel()
    curve = curve or load_curve(seed=seed)
    rng = random.Random(seed)
    hpa = HorizontalPodAutoscaler(spec)
    fleet = RelayFleet(model, spec.min_replicas)
    result = SimResult()
    for t in range(duration):
        fleet.tick(t, result)
        want = curve(t)
        have = fleet.viewers
        if want > have:
            arriving = want - have
            fleet.waiting += arriving - fleet.place(arriving)
        elif want < have:
            fleet.leave(have - want, rng)
        result.waiting_viewer_seconds += fleet.waiting
        result.peak_viewers = max(result.peak_viewers, fleet.viewers)
        if t % spec.sync_period_seconds == 0:
            values, unready = fleet.metrics()
            current = fleet.replicas
            desired = hpa.reconcile(t, current, values, unready)
            if desired != current:
                result.scale_events.append((t, desired - current))
                fleet.scale_to(desired, t)
            result.replicas.append((t, fleet.replicas))
        if t % 60 == 0:
            loads = fleet.metrics()[0]["lotcast_relay_load_ratio"]
            avg = sum(loads) / len(loads) if loads else 0.0
            result.rows.append(
                f"{t // 60:4d} min  viewers {fleet.viewers:6d}  replicas {fleet.replicas:3d}  "
                f"ready {len(fleet.of(RelayPhase.SERVING)):3d}  "
                f"draining {len(fleet.of(RelayPhase.DRAINING)):2d}  load {avg:4.2f}  "
                f"{'#' * fleet.replicas}")
    return result


def flaps(events: Sequence[tuple[int, int]], window: int) -> list[tuple[int, int, int]]:
    """Up-then-down-then-up (or down-up-down) sequences of scale events within `window` s."""
    found = []
    for (t1, d1), (t2, d2), (t3, d3) in zip(events, events[1:], events[2:], strict=False):
        if (d1 > 0) != (d2 > 0) and (d2 > 0) != (d3 > 0) and t3 - t1 <= window:
            found.append((t1, t2, t3))
    return found


def reversals(events: Sequence[tuple[int, int]], window: int) -> list[tuple[int, int]]:
    """A scale-down less than `window` s after a scale-up (what the stabilisation window forbids)."""
    return [(t1, t2) for (t1, d1), (t2, d2) in itertools.pairwise(events)
            if d1 > 0 > d2 and t2 - t1 < window]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lotcast.ops.hpa_sim",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--peak", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--manifest", type=Path, default=None,
                        help="read the HPA from this HorizontalPodAutoscaler YAML")
    args = parser.parse_args(argv)
    spec = HpaSpec()
    if args.manifest is not None:
        import yaml

        spec = HpaSpec.from_manifest(yaml.safe_load(args.manifest.read_text()))
    result = simulate(spec, curve=load_curve(args.peak, args.seed), seed=args.seed)
    print("\n".join(result.rows))
    window = spec.scale_down.stabilization_window_seconds
    found = flaps(result.scale_events, window)
    longest = max((d for _, d, _ in result.drains), default=0)
    print(f"peak viewers {result.peak_viewers}, max replicas {result.max_replicas}, "
          f"scale events {len(result.scale_events)}, flaps within {window}s: {len(found)}, "
          f"drains {len(result.drains)} (longest {longest}s), "
          f"viewers dropped on scale-down: {result.dropped}, "
          f"viewer-seconds without a relay: {result.waiting_viewer_seconds}")
    return 0 if not found and result.dropped == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
