#!/bin/bash
# nginx serving a file written into the rootfs after start, and a client with one keep-alive
# connection across the checkpoint (http_client.py). Writes /tmp/ready when all is set.
set -e
# Workers as root: CRIU cannot dump a process of another user on a host without CAP_SYS_RESOURCE
# (see docs/workloads.md).
sed -i 's/^user .*/user root;/' /etc/nginx/nginx.conf
nginx -e /tmp/nginx-error.log -g 'daemon off; error_log /tmp/nginx-error.log;' &
until python3 -c 'import socket; socket.create_connection(("127.0.0.1", 80)).close()' 2>/dev/null; do sleep 0.05; done
echo "served-$(cat /proc/sys/kernel/random/uuid)" > /var/www/html/token.txt
python3 /workloads/http_client.py &
touch /tmp/ready
wait
