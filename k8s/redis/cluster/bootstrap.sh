#!/bin/sh
# Forms the cluster once: waits until all 6 pods answer, then, unless redis-cluster-0 already
# knows other nodes, `redis-cli --cluster create` with one replica per primary. Idempotent: a
# re-run (or a Job retry) against a formed cluster only checks it.
set -eu
NODES=""
for i in 0 1 2 3 4 5; do
  HOST="redis-cluster-${i}.redis-cluster-headless"
  until redis-cli -h "${HOST}" ping 2>/dev/null | grep -q PONG; do
    echo "bootstrap: waiting for ${HOST}"; sleep 2
  done
  NODES="${NODES} ${HOST}:6379"
done
KNOWN="$(redis-cli -h redis-cluster-0.redis-cluster-headless cluster info \
  | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')"
if [ "${KNOWN}" -gt 1 ]; then
  echo "bootstrap: already formed (${KNOWN} nodes)"
else
  # shellcheck disable=SC2086
  redis-cli --cluster create ${NODES} --cluster-replicas 1 --cluster-yes
fi
until redis-cli -h redis-cluster-0.redis-cluster-headless cluster info | grep -q 'cluster_state:ok'; do
  echo "bootstrap: waiting for cluster_state:ok"; sleep 2
done
redis-cli --cluster check redis-cluster-0.redis-cluster-headless:6379
