"""k8s (issue 13): the broadcaster is a scalable set of origins with a disruption budget, a preStop
drain and a grace period longer than the drain, each origin reachable under its own URL."""

from __future__ import annotations

import pytest
from test_k8s import (
    OVERLAYS,
    container_env,
    lotcast_container,
    objects,
    of_kind,
    pod_labels,
    pod_spec,
    selector_matches,
)


@pytest.mark.parametrize("overlay", [*OVERLAYS, "prod-cluster"])  # prod-cluster: prod on Redis Cluster
def test_broadcaster_is_several_draining_origins(overlay: str) -> None:
    objs = objects(overlay)
    origin, container = lotcast_container(objs, "broadcaster")
    spec, env = pod_spec(origin), container_env(objs, container)
    assert origin["spec"]["replicas"] >= 2
    assert origin["spec"]["strategy"]["type"] == "RollingUpdate"
    assert origin["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["terminationGracePeriodSeconds"] >= float(env["LOTCAST_DRAIN_TIMEOUT"]) + 10
    assert "kill -TERM 1" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (pdb,) = [p for p in of_kind(objs, "PodDisruptionBudget")
              if selector_matches(p["spec"]["selector"], pod_labels(origin))]
    assert pdb["spec"]["maxUnavailable"] == 1
    # one per node (its host ports), and a URL per pod: 307s and relay pulls name one origin
    terms = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname"
               and selector_matches(t["labelSelector"], pod_labels(origin)) for t in terms)
    url = env["LOTCAST_PUBLIC_URL"]
    assert "$(NODE_NAME)" in url or "$(LOTCAST_ICE_ANNOUNCE_IP)" in url, url
    names = [e["name"] for e in container["env"]]
    referenced = "NODE_NAME" if "$(NODE_NAME)" in url else "LOTCAST_ICE_ANNOUNCE_IP"
    assert names.index(referenced) < names.index("LOTCAST_PUBLIC_URL")  # defined before use
