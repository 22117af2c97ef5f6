#!/bin/sh
# Writes /data/sentinel.conf (Sentinel rewrites it at run time, so it lives on a writable volume).
set -eu
MASTER=""
for i in 0 1 2; do
  MASTER="$(timeout 3 redis-cli -h "redis-sentinel-${i}.redis-sentinel-headless" -p 26379 --raw \
    sentinel get-master-addr-by-name lotcast 2>/dev/null | head -n 1 || true)"
  [ -n "${MASTER}" ] && break
done
[ -n "${MASTER}" ] || MASTER="redis-0.redis-headless"
cat > /data/sentinel.conf <<CONF
port 26379
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${HOSTNAME}.redis-sentinel-headless
sentinel monitor lotcast ${MASTER} 6379 2
sentinel auth-pass lotcast ${REDIS_PASSWORD}
sentinel down-after-milliseconds lotcast 5000
sentinel failover-timeout lotcast 60000
sentinel parallel-syncs lotcast 1
CONF
echo "init-sentinel: monitoring ${MASTER}"
