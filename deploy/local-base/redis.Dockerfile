# A local stand-in for the official redis:7.0-bookworm images, for machines
# without a registry (scripts/ensure-images builds it under the exact tag
# compose.yaml names). Same interface: the redis user as uid 999, data in
# /data, redis-server as the command (protected mode off when run without
# a configuration file, as the official entry point does), redis-cli for
# health checks.
FROM debian:12.12-slim
RUN groupadd -r -g 999 redis \
 && useradd -r -g redis -u 999 --home-dir /data redis
# Unpinned like the image it stands in for (see postgres.Dockerfile).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME ["/data"]
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
