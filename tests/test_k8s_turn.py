"""k8s/components/turn (coturn) in both overlays, checked offline: what it references, that it
relays only to the lotcast nodes, and that its container script and turnserver.conf run a real
coturn that grants allocations with node-minted credentials and refuses any other peer.

The generic checks of tests/test_k8s.py (kustomize, kubernetes-validate, checkov, selectors,
probes, resources, references) cover these objects too, since both overlays include the component.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from aioice import stun, turn
from test_k8s import (
    Obj,
    container_env,
    lotcast_container,
    named,
    objects,
    of_kind,
    overlay,  # noqa: F401  (the parametrized fixture)
    pod_labels,
    pod_spec,
    selector_matches,
    workloads,
)

from lotcast.turn import (
    _is_binding_success,
    check_turn_settings,
    free_udp_tcp_port,
    mint_credentials,
    self_signed_certificate,
)

pytestmark = pytest.mark.timeout(60)


def turn_parts(objs: tuple[Obj, ...]) -> tuple[Obj, Obj, str]:
    deployment = named(objs, "Deployment", "lotcast-turn")
    (container,) = pod_spec(deployment)["containers"]
    conf = named(objs, "ConfigMap", "coturn-config")["data"]["turnserver.conf"]
    return deployment, container, conf


def conf_values(conf: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in conf.splitlines() if line.startswith(key + "=")]


def peer_range(conf: str) -> ipaddress.IPv4Network:
    (allowed,) = conf_values(conf, "allowed-peer-ip")
    low, high = (ipaddress.IPv4Address(a) for a in allowed.split("-"))
    (network,) = ipaddress.summarize_address_range(low, high)
    return network


def test_coturn_uses_the_shared_secret_and_the_nodes_advertise_it(overlay: str) -> None:  # noqa: F811
    objs = objects(overlay)
    deployment, container, conf = turn_parts(objs)
    spec = pod_spec(deployment)
    assert not spec.get("hostNetwork"), "coturn runs behind its Service, not on the host network"
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = volumes["secret"]["secret"]
    assert re.fullmatch(r"lotcast-secrets(-[a-z0-9]{10})?", secret["secretName"])
    # TURNS in prod from the nodes' wildcard certificate (components/turn-tls); none in dev
    tls = "turns" if overlay == "prod" else None
    if tls:
        assert volumes["tls"]["secret"]["secretName"] == "lotcast-tls"
        assert volumes["tls"]["secret"]["defaultMode"] & 0o047 == 0o040
    else:
        assert "emptyDir" in volumes["tls"]
    assert secret["items"] == [{"key": "turn-secret", "path": "turn-secret"}]
    assert "turn-secret" in container["args"][0] and "static-auth-secret" in container["args"][0]
    # the secret goes into a file, never into the command line or the environment
    assert not any("turn-secret" in str(e) for e in container.get("env", []))
    assert "use-auth-secret" in conf.splitlines()
    assert not conf_values(conf, "static-auth-secret")
    if overlay == "dev":
        generated = next(s for s in of_kind(objs, "Secret")
                         if s["metadata"]["name"].startswith("lotcast-secrets"))
        assert "turn-secret" in generated["data"]
    service = named(objs, "Service", "lotcast-turn")
    assert {(p["protocol"], p["port"]) for p in service["spec"]["ports"]} >= {
        ("UDP", 3478), ("TCP", 3478), ("TCP", 5349)}
    assert conf_values(conf, "listening-port") == ["3478"]
    assert conf_values(conf, "tls-listening-port") == ["5349"]
    for component in ("relay", "broadcaster"):
        _, node = lotcast_container(objs, component)
        env = container_env(objs, node)
        urls = env["LOTCAST_TURN_URLS"].split(",")
        check_turn_settings(urls, "present", float(env["LOTCAST_TURN_TTL"]))
        expected = {"turn:3478?transport=udp", "turn:3478?transport=tcp"}
        if tls:
            expected.add("turns:5349?transport=tcp")
        assert {u.split(":", 1)[0] + ":" + u.rsplit(":", 1)[1] for u in urls} == expected
        # one TURN name, under the wildcard the nodes' certificate covers
        assert {u.split(":")[1] for u in urls} == {"turn.edge.lotcast.example.com"}
        (ref,) = [e for e in node["env"] if e["name"] == "LOTCAST_TURN_SECRET"]
        key_ref = ref["valueFrom"]["secretKeyRef"]
        assert key_ref["key"] == "turn-secret" and key_ref["name"] == secret["secretName"]


def test_coturn_reaches_only_the_lotcast_nodes(overlay: str) -> None:  # noqa: F811
    objs = objects(overlay)
    deployment, _, conf = turn_parts(objs)
    labels = pod_labels(deployment)
    policies = [p for p in of_kind(objs, "NetworkPolicy")
                if p["spec"]["podSelector"] and selector_matches(p["spec"]["podSelector"], labels)]
    egress_policies = [p for p in policies if "Egress" in p["spec"]["policyTypes"]]
    assert egress_policies, "no egress policy for coturn: it could relay anywhere"
    nodes = {w["metadata"]["name"] for w in workloads(objs)
             if pod_labels(w).get("app.kubernetes.io/component") in ("relay", "broadcaster")}
    subnet = peer_range(conf)
    for policy in egress_policies:
        for rule in policy["spec"]["egress"]:
            assert {p["protocol"] for p in rule["ports"]} == {"UDP"}, rule
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    assert ipaddress.ip_network(peer["ipBlock"]["cidr"]) == subnet, peer
                    continue
                selected = {w["metadata"]["name"] for w in workloads(objs)
                            if selector_matches(peer["podSelector"], pod_labels(w))}
                assert selected == nodes, peer
    # coturn's own peer list: everything denied but the node subnet (also where NetworkPolicy
    # is not enforced)
    assert "0.0.0.0-255.255.255.255" in conf_values(conf, "denied-peer-ip")
    assert not any(line.strip() == "allow-loopback-peers" for line in conf.splitlines())
    for flag in ("no-multicast-peers", "no-cli", "no-tlsv1", "no-tlsv1_1", "fingerprint"):
        assert flag in conf.splitlines(), flag


class _Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.errors: list[Exception] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


async def test_the_container_script_and_conf_run_a_real_coturn(tmp_path: Path) -> None:
    """The rendered prod Deployment's script and turnserver.conf, paths moved under tmp_path, the
    listener ports made free, and the node subnet replaced by 127.0.0.1 (with loopback peers
    allowed, as nothing else is reachable here): coturn starts, the secret stays off its command
    line, a node-minted pair allocates over UDP and TLS, data reaches an allowed peer, and a
    permission for any other address is refused (403)."""
    _, container, conf = turn_parts(objects("prod"))
    port, tls_port = free_udp_tcp_port(), free_udp_tcp_port()
    root = {name: tmp_path / name for name in ("conf", "secret", "tls", "run")}
    for path in root.values():
        path.mkdir()
    subnet = str(peer_range(conf).network_address)
    assert conf.count(f"allowed-peer-ip={subnet}-") == 1
    conf = re.sub(r"^allowed-peer-ip=.*$", "allowed-peer-ip=127.0.0.1\nallow-loopback-peers",
                  conf, flags=re.M)
    conf = conf.replace("listening-port=3478", f"listening-port={port}")
    conf = conf.replace("tls-listening-port=5349", f"tls-listening-port={tls_port}")
    conf = conf.replace("log-file=stdout", f"log-file={root['run'] / 'turn.log'}")
    (root["conf"] / "turnserver.conf").write_text(_move_paths(conf, root))
    secret = "k8s-turn-secret-0123456789"
    (root["secret"] / "turn-secret").write_text(secret)
    self_signed_certificate(root["tls"] / "tls.crt", root["tls"] / "tls.key", ["127.0.0.1"])
    script = _move_paths(container["args"][0], root)
    proc = subprocess.Popen(["/bin/sh", "-c", script], env={**os.environ, "POD_IP": "127.0.0.1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_binding(proc, port, root["run"])
        assert secret not in " ".join(_cmdline(proc.pid))
        generated = root["run"] / "turnserver.conf"
        assert generated.stat().st_mode & 0o077 == 0
        assert f"static-auth-secret={secret}" in generated.read_text().splitlines()
        creds = mint_credentials(secret, "k8s", 60)
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        loop = asyncio.get_running_loop()
        target, target_proto = await loop.create_datagram_endpoint(
            _Peer, local_addr=("127.0.0.1", 0))
        try:
            peer_addr = target.get_extra_info("sockname")
            for server, ctx, transport in ((port, None, "udp"), (tls_port, tls, "tcp")):
                endpoint, client = await asyncio.wait_for(turn.create_turn_endpoint(
                    _Peer, ("127.0.0.1", server), creds.username, creds.credential, ssl=ctx,
                    transport=transport), 10)
                try:
                    endpoint.sendto(b"to-a-node", peer_addr)
                    endpoint.sendto(b"into-the-cluster", ("127.0.0.2", 9))
                    endpoint.sendto(b"anywhere", ("192.168.1.1", 9))
                    await _until(lambda c=client: len(c.errors) >= 2 and target_proto.received)
                finally:
                    endpoint.close()
                codes = sorted(e.response.attributes["ERROR-CODE"][0] for e in client.errors
                               if isinstance(e, stun.TransactionFailed))
                assert codes == [403, 403], client.errors
                assert target_proto.received.pop() == b"to-a-node"
        finally:
            target.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def _move_paths(text: str, root: dict[str, Path]) -> str:
    text = text.replace("/tmp/", f"{root['run']}/")  # first: tmp_path itself is under /tmp
    for name in ("conf", "secret", "tls"):
        text = text.replace(f"/etc/coturn/{name}", str(root[name]))
    return text


def _cmdline(pid: int) -> list[str]:
    import psutil

    proc = psutil.Process(pid)
    return [arg for p in [proc, *proc.children(recursive=True)] for arg in p.cmdline()]


def _wait_binding(proc: subprocess.Popen[bytes], port: int, run: Path) -> None:
    import socket

    request = bytes(stun.Message(message_method=stun.Method.BINDING,
                                 message_class=stun.Class.REQUEST))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, _log(run)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            try:
                sock.sendto(request, ("127.0.0.1", port))
                if _is_binding_success(sock.recv(2048)):
                    return
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"coturn from the k8s script never answered:\n{_log(run)}")


def _log(run: Path) -> str:
    logs = sorted(run.glob("turn*.log"))
    return logs[-1].read_text(errors="replace")[-3000:] if logs else "(no log)"


async def _until(check: Any, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
