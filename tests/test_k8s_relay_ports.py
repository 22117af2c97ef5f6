"""Offline checks that the relay manifests open exactly the relay's media ports: one UDP port per
worker (LOTCAST_UDP_PORT + i, i < the worker count, which follows limits.cpu), as container ports
mapped to the same node port (hostPort), in the headless Service lotcast-relay-media and in the
relays' NetworkPolicy, in every overlay; that relays run without hostNetwork, binding the pod IP
and announcing the node's (LOTCAST_ICE_IP / LOTCAST_ICE_ANNOUNCE_IP); and that the broadcaster
does the same with its one UDP port (LOTCAST_UDP_PORT, no hostNetwork), opened alone."""

from __future__ import annotations

import pytest
from test_k8s import (
    OVERLAYS,
    container_env,
    lotcast_container,
    named,
    objects,
    of_kind,
    pod_labels,
    pod_spec,
    selector_matches,
)

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


def _field(container: dict, name: str) -> str | None:
    entry = next((e for e in container["env"] if e["name"] == name), None)
    assert entry is not None, f"{name} missing"
    path = entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    return str(path) if path is not None else None


def _host_ports_of_pod_bound_media(workload: dict, container: dict) -> list[tuple]:
    """(name, protocol, containerPort, hostPort) of every port, after checking the pod is in
    the pod network, binds its media to the pod IP and announces the node's."""
    spec = pod_spec(workload)
    assert "hostNetwork" not in spec and "dnsPolicy" not in spec, spec
    assert _field(container, "LOTCAST_ICE_IP") == "status.podIP"
    assert _field(container, "LOTCAST_ICE_ANNOUNCE_IP") == "status.hostIP"
    return [(p["name"], p["protocol"], p["containerPort"], p.get("hostPort"))
            for p in container["ports"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_relays_bind_the_pod_ip_and_announce_the_node_ip_through_host_ports(overlay: str) -> None:
    workload, container, workers, base = _relay(overlay)
    # every port the relay serves is the node's port of the same number
    mapped = _host_ports_of_pod_bound_media(workload, container)
    assert mapped == [("http", "TCP", 8081, 8081),
                      *((f"media-{i}", "UDP", base + i, base + i) for i in range(workers))]
    # browsers and other nodes reach it at the node's address (prod: the node's DNS name)
    public = next(e for e in container["env"] if e["name"] == "LOTCAST_PUBLIC_URL")["value"]
    assert public in ("http://$(LOTCAST_ICE_ANNOUNCE_IP):8081",
                      "https://$(NODE_NAME).edge.lotcast.example.com:8081"), public
    names = [e["name"] for e in container["env"]]
    assert names.index("LOTCAST_ICE_ANNOUNCE_IP") < names.index("LOTCAST_PUBLIC_URL")
    annotations = workload["metadata"].get("annotations", {})
    assert not any("CKV_K8S_19" in v for v in annotations.values())  # no hostNetwork skip left
    assert any(v.startswith("CKV_K8S_26=") for v in annotations.values())  # hostPort, with why


def _allowed(policy: dict) -> list[tuple[str, int, int]]:
    """(protocol, first port, last port) of every ingress port rule, from anywhere."""
    out = []
    for rule in policy["spec"]["ingress"]:
        assert "from" not in rule, rule
        for p in rule["ports"]:
            out.append((p["protocol"], int(p["port"]), int(p.get("endPort", p["port"]))))
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_relay_network_policy_opens_exactly_its_ports(overlay: str) -> None:
    objs = objects(overlay)
    _, _, workers, base = _relay(overlay)
    policies = of_kind(objs, "NetworkPolicy")
    relay_labels = {"app.kubernetes.io/name": "lotcast", "app.kubernetes.io/component": "relay",
                    "app.kubernetes.io/part-of": "lotcast"}
    selecting = [p for p in policies if p["spec"]["podSelector"]
                 and selector_matches(p["spec"]["podSelector"], relay_labels)]
    assert [p["metadata"]["name"] for p in selecting] == ["lotcast-relay-ingress"]
    assert _allowed(selecting[0]) == [("TCP", 8081, 8081), ("UDP", base, base + workers - 1)]
    # the default deny still covers relays, so nothing else is open to them
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_broadcaster_serves_media_on_one_host_port_without_host_network(overlay: str) -> None:
    objs = objects(overlay)
    workload, container = lotcast_container(objs, "broadcaster")
    env = container_env(objs, container)
    port = int(env["LOTCAST_UDP_PORT"])
    mapped = _host_ports_of_pod_bound_media(workload, container)
    assert mapped == [("http", "TCP", 8080, 8080), ("media", "UDP", port, port)]
    # an origin and a relay may share a node: their host ports must not collide
    _, _, workers, base = _relay(overlay)
    assert not base <= port < base + workers, (port, base, workers)
    public = env["LOTCAST_PUBLIC_URL"]
    assert public in ("http://$(LOTCAST_ICE_ANNOUNCE_IP):8080",
                      "https://$(NODE_NAME).edge.lotcast.example.com:8080"), public
    annotations = workload["metadata"].get("annotations", {})
    assert not any("CKV_K8S_19" in v for v in annotations.values())
    assert any(v.startswith("CKV_K8S_26=") for v in annotations.values())
    policy = named(objs, "NetworkPolicy", "lotcast-broadcaster-ingress")
    assert selector_matches(policy["spec"]["podSelector"], pod_labels(workload))
    assert _allowed(policy) == [("TCP", 8080, 8080), ("UDP", port, port)]
