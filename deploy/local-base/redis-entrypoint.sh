#!/bin/sh
# The official image's entry point, in short: as root, take ownership of
# /data and drop to the redis user; without a configuration file, turn
# protected mode off (the container's network is the boundary).
set -eu

if [ "${1:-}" = redis-server ]; then
  if [ "$(id -u)" = 0 ]; then
    chown -R redis:redis /data
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
  fi
  case "${2:-}" in
    *.conf) ;;
    *) shift; set -- redis-server --protected-mode no "$@" ;;
  esac
fi
exec "$@"
