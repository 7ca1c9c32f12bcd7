#!/bin/bash
# Redis with keys in memory only, keys saved to a file on the rootfs, and a client holding one
# connection across the checkpoint (redis_client.py). Writes /tmp/ready when all is set.
set -e
mkdir -p /var/lib/redis
redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no --dir /var/lib/redis \
  --daemonize no --logfile /tmp/redis.log &
until redis-cli -p 6379 ping >/dev/null 2>&1; do sleep 0.05; done
redis-cli SET disk:key on-disk >/dev/null
redis-cli SAVE >/dev/null
redis-cli SET mem:key in-memory-only >/dev/null
python3 /workloads/redis_client.py &
touch /tmp/ready
wait
