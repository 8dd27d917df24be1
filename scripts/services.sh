#!/usr/bin/env bash
# Make sure the real Redis and PostgreSQL the tests use are running on 127.0.0.1;
# start them (installing them first on a bare Debian machine) if not. Fails loudly.
set -euo pipefail

have_redis() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
have_pg() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }

install_missing() {
  local pkgs=()
  command -v redis-server >/dev/null || pkgs+=(redis-server)
  command -v pg_ctlcluster >/dev/null || pkgs+=(postgresql)
  if [ ${#pkgs[@]} -gt 0 ]; then
    echo "services: installing ${pkgs[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >&2
  fi
}

if ! have_redis; then
  install_missing
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do have_redis && break; sleep 0.1; done
fi
if ! have_pg; then
  install_missing
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  for _ in $(seq 100); do have_pg && break; sleep 0.1; done
fi
have_redis || { echo "services: Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }
have_pg || { echo "services: PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }
# The tests connect as postgres with trust auth and create their own databases.
psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1" >/dev/null \
  || { echo "services: cannot connect to PostgreSQL as postgres (trust auth expected)" >&2; exit 1; }
psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" \
  | grep -q 1 || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test"
echo "services: Redis and PostgreSQL are up" >&2
