#!/bin/sh
# Writes /config/redis.conf for this pod: the shared durability config plus cluster mode. Nodes
# announce their stable DNS name (not the pod IP, which changes on restart), and nodes.conf lives
# on the PersistentVolume, so a restarted pod rejoins with its identity and role.
set -eu
SELF="${HOSTNAME}.redis-cluster-headless"
cp /etc/redis/redis.conf /config/redis.conf
cat >> /config/redis.conf <<CONF
cluster-enabled yes
cluster-config-file /data/nodes.conf
cluster-node-timeout 5000
cluster-require-full-coverage no
cluster-announce-hostname ${SELF}
cluster-preferred-endpoint-type hostname
CONF
echo "init-cluster-node: ${SELF}"
