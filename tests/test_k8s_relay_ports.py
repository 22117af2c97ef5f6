"""Offline checks that the relay manifests open exactly the relay's media ports: one UDP port per
worker (LOTCAST_UDP_PORT + i, i < the worker count, which follows limits.cpu), as container ports
and in the headless Service lotcast-relay-media, in every overlay; and that hostNetwork stays
only for the reason the manifest gives (the relay advertises and binds the node's address)."""

from __future__ import annotations

import pytest
from test_k8s import OVERLAYS, container_env, lotcast_container, named, objects, pod_spec

pytestmark = pytest.mark.timeout(120)


def _relay(overlay: str) -> tuple[dict, dict, int, int]:
    objs = objects(overlay)
    workload, container = lotcast_container(objs, "relay")
    workers = int(str(container["resources"]["limits"]["cpu"]))
    env = container_env(objs, container)
    assert "LOTCAST_UDP_PORT" in env, "relays must serve media on one UDP port per worker"
    return workload, container, workers, int(env["LOTCAST_UDP_PORT"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_relay_container_lists_one_udp_port_per_worker(overlay: str) -> None:
    _, container, workers, base = _relay(overlay)
    assert 1024 <= base and base + workers - 1 <= 65535
    udp = [(p["name"], p["containerPort"]) for p in container["ports"] if p["protocol"] == "UDP"]
    assert udp == [(f"media-{i}", base + i) for i in range(workers)], (overlay, udp)
    tcp = [(p["name"], p["containerPort"]) for p in container["ports"] if p["protocol"] == "TCP"]
    assert tcp == [("http", 8081)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_relay_media_service_names_exactly_those_ports(overlay: str) -> None:
    objs = objects(overlay)
    _, _, workers, base = _relay(overlay)
    service = named(objs, "Service", "lotcast-relay-media")
    spec = service["spec"]
    assert spec["clusterIP"] == "None"  # headless: a viewer's media goes to its own relay
    assert spec["selector"] == {"app.kubernetes.io/name": "lotcast",
                                "app.kubernetes.io/component": "relay"}
    ports = [(p["name"], p["port"], p["targetPort"], p["protocol"]) for p in spec["ports"]]
    assert ports == [(f"media-{i}", base + i, f"media-{i}", "UDP") for i in range(workers)]
    # no other Service of the relay carries UDP
    other = named(objs, "Service", "lotcast-relay")
    assert all(p.get("protocol", "TCP") == "TCP" for p in other["spec"]["ports"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_relay_host_network_only_while_it_advertises_the_node_address(overlay: str) -> None:
    workload, container, _, _ = _relay(overlay)
    ice = next(e for e in container["env"] if e["name"] == "LOTCAST_ICE_IP")
    advertises_node = ice.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.hostIP"
    assert bool(pod_spec(workload).get("hostNetwork")) == advertises_node
    if advertises_node:
        assert "CKV_K8S_19" in workload["metadata"]["annotations"]["checkov.io/skip1"]
