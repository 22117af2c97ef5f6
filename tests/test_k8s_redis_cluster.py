"""Offline checks of the Redis Cluster option: k8s/overlays/prod-cluster (prod with
k8s/redis/cluster instead of Sentinel) builds, validates, passes checkov, and hangs together."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import test_k8s
from test_k8s import (
    K8S,
    container_env,
    lotcast_container,
    named,
    objects,
    of_kind,
    pod_labels,
    pod_spec,
    run,
    selector_matches,
)

pytestmark = pytest.mark.timeout(120)

OVERLAY = "prod-cluster"
# the same out-of-band Secrets as prod (lotcast-secrets carries the redis+cluster:// URL)
test_k8s.EXTERNAL_SECRETS.setdefault(OVERLAY, test_k8s.EXTERNAL_SECRETS["prod"])


@pytest.mark.parametrize("check", [
    test_k8s.test_kustomize_builds, test_k8s.test_workload_selectors_match_their_pods,
    test_k8s.test_services_select_pods_with_the_target_ports,
    test_k8s.test_hpa_and_pdb_targets_exist, test_k8s.test_network_policies_select_pods,
    test_k8s.test_every_container_has_probes_and_resources, test_k8s.test_references_resolve,
    test_k8s.test_lotcast_env_names_are_settings_fields, test_k8s.test_relay_drain_contract,
])
def test_the_prod_checks_hold(check: object) -> None:
    check(OVERLAY)  # type: ignore[operator]


def test_kubernetes_validate_strict(tmp_path: Path) -> None:
    test_k8s.test_kubernetes_validate_strict(OVERLAY, tmp_path)


def test_checkov_passes_with_documented_skips_only(tmp_path: Path) -> None:
    test_k8s.test_checkov_passes_with_documented_skips_only(OVERLAY, tmp_path)


def test_sentinel_layout_is_replaced_by_the_cluster() -> None:
    objs = objects(OVERLAY)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for gone in [("StatefulSet", "redis"), ("StatefulSet", "redis-sentinel"),
                 ("Deployment", "redis-haproxy"), ("Service", "redis")]:
        assert gone not in names, gone
    assert not [o for o in of_kind(objs, "ConfigMap")
                if re.match(r"redis-(scripts|haproxy-config)-", o["metadata"]["name"])]
    # the rest of prod is all there
    prod = {(o["kind"], o["metadata"]["name"]) for o in objects("prod")
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/name") != "redis"
            and not o["metadata"]["name"].startswith(("redis-scripts", "redis-haproxy",
                                                      "lotcast-config"))}
    assert prod <= names, prod - names


def test_cluster_statefulset_job_and_pdb() -> None:
    objs = objects(OVERLAY)
    sts = named(objs, "StatefulSet", "redis-cluster")
    assert sts["spec"]["replicas"] == 6  # 3 primaries + 3 replicas
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    (redis,) = pod_spec(sts)["containers"]
    assert {p["containerPort"] for p in redis["ports"]} == {6379, 16379}
    assert any(m["mountPath"] == "/data" for m in redis["volumeMounts"])
    scripts = named(objs, "ConfigMap", "redis-cluster-scripts")["data"]
    init = scripts["init-cluster-node.sh"]
    for line in ("cluster-enabled yes", "cluster-config-file /data/nodes.conf",
                 "cluster-require-full-coverage no", "cluster-preferred-endpoint-type hostname"):
        assert line in init
    conf = named(objs, "ConfigMap", "redis-config")["data"]["redis.conf"]
    assert {"appendonly yes", "appendfsync always"} <= {x.strip() for x in conf.splitlines()}
    job = named(objs, "Job", "redis-cluster-bootstrap")
    (boot,) = pod_spec(job)["containers"]
    assert boot["command"] == ["sh", "/scripts/bootstrap.sh"]
    assert "--cluster create ${NODES} --cluster-replicas 1 --cluster-yes" in scripts[
        "bootstrap.sh"]
    assert scripts["bootstrap.sh"].count("redis-cluster-${i}.redis-cluster-headless") == 1
    assert "for i in 0 1 2 3 4 5" in scripts["bootstrap.sh"]
    (pdb,) = [p for p in of_kind(objs, "PodDisruptionBudget")
              if p["metadata"]["name"] == "redis-cluster"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert selector_matches(pdb["spec"]["selector"], pod_labels(sts))
    headless = named(objs, "Service", "redis-cluster-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in headless["spec"]["ports"]} == {6379, 16379}
    bus = named(objs, "NetworkPolicy", "redis-cluster-bus")
    assert selector_matches(bus["spec"]["podSelector"], pod_labels(sts))
    assert bus["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 16379}]
    ingress = named(objs, "NetworkPolicy", "redis-ingress")  # the app reaches 6379
    assert selector_matches(ingress["spec"]["podSelector"], pod_labels(sts))


def test_the_nodes_use_the_cluster_with_durable_acks() -> None:
    objs = objects(OVERLAY)
    for component in ("broadcaster", "relay"):
        _, container = lotcast_container(objs, component)
        env = container_env(objs, container)
        assert env["LOTCAST_REDIS_ACK"] == "wait"
        (url,) = [e for e in container["env"] if e["name"] == "LOTCAST_REDIS_URL"]
        assert url["valueFrom"]["secretKeyRef"] == {"name": "lotcast-secrets", "key": "redis-url"}
    text = (K8S / "overlays" / OVERLAY / "kustomization.yaml").read_text()
    assert "redis+cluster://:<password>@redis-cluster-0.redis-cluster-headless:6379" in text


def test_cluster_scripts_are_valid_shell() -> None:
    for script in (K8S / "redis/cluster").glob("*.sh"):
        proc = run(["sh", "-n", str(script)])
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
