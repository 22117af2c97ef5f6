#!/bin/sh
# Writes /config/redis.conf for this pod: the shared durability config, plus `replicaof` the
# current master. The master is whatever the Sentinels say; only when no Sentinel answers (first
# start of the whole set) does redis-0 start as master and the others as its replicas.
set -eu
SELF="${HOSTNAME}.redis-headless"
cp /etc/redis/redis.conf /config/redis.conf
echo "replica-announce-ip ${SELF}" >> /config/redis.conf
MASTER=""
for i in 0 1 2; do
  MASTER="$(timeout 3 redis-cli -h "redis-sentinel-${i}.redis-sentinel-headless" -p 26379 --raw \
    sentinel get-master-addr-by-name lotcast 2>/dev/null | head -n 1 || true)"
  [ -n "${MASTER}" ] && break
done
if [ -z "${MASTER}" ]; then
  MASTER="redis-0.redis-headless"
fi
if [ "${MASTER}" != "${SELF}" ]; then
  echo "replicaof ${MASTER} 6379" >> /config/redis.conf
fi
echo "init-redis: ${SELF} master=${MASTER}"
