#!/bin/bash
# PostgreSQL with a committed table on the rootfs, and a psql session (over the unix socket) that
# holds a temp table and an open transaction across the checkpoint. The session reads its
# commands from the fifo /tmp/psql.in (this script keeps it open) and writes to /tmp/psql.out.
set -e
# containerd mounts a tmpfs on /run.
mkdir -p /run/postgresql && chown postgres:postgres /run/postgresql
su postgres -c "/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main \
  -c config_file=/etc/postgresql/15/main/postgresql.conf -c listen_addresses=''" >/tmp/pg.log 2>&1 &
for i in $(seq 200); do
  su postgres -c "psql -X -q -c 'select 1'" >/dev/null 2>&1 && break
  [ "$i" = 200 ] && { echo "postgres did not start:"; tail -5 /tmp/pg.log; su postgres -c "psql -X -q -c 'select 1'"; exit 1; }
  sleep 0.1
done
su postgres -c "psql -X -q -c \"create table kept(v text); insert into kept values ('committed')\""
mkfifo /tmp/psql.in
chmod 666 /tmp/psql.in
su postgres -c "psql -X -q -A -t" </tmp/psql.in >/tmp/psql.out 2>&1 &
exec 3>/tmp/psql.in
echo "BEGIN; CREATE TEMP TABLE t(v int); INSERT INTO t VALUES (42); INSERT INTO kept VALUES ('in-tx'); SELECT 'before', count(*) FROM t;" >&3
until grep -q '^before|1$' /tmp/psql.out; do sleep 0.05; done
touch /tmp/ready
wait
