# A local stand-in for the official postgres:15-bookworm images, for machines
# without a registry (scripts/ensure-images builds it under the exact tag
# compose.yaml names). It keeps the interface compose.yaml relies on: the
# postgres user as uid 999, PGDATA at /var/lib/postgresql/data, initialised
# on first start from POSTGRES_USER, POSTGRES_PASSWORD(_FILE) and
# POSTGRES_DB, pg_isready on the PATH, SIGINT as the stop signal.
FROM debian:12.15-slim
# checkov:skip=CKV_DOCKER_2: the Compose stack defines the health check (pg_isready), as with the official image
# checkov:skip=CKV_DOCKER_3: a stand-in for the official postgres image: its entry point starts as root to hand the data folder to the postgres user (999) and drops to it
RUN groupadd -r postgres --gid=999 \
 && useradd -r -g postgres --uid=999 --home-dir=/var/lib/postgresql --shell=/bin/bash postgres \
 && mkdir -p /var/lib/postgresql /etc/postgresql-common/createcluster.d \
 && chown -R postgres:postgres /var/lib/postgresql \
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/no-main.conf
# Unpinned like the image it stands in for: the tag fixes the major version,
# and Debian keeps only the latest point release of it in the archive.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
RUN mkdir -p "$PGDATA" /var/run/postgresql \
 && chown postgres:postgres "$PGDATA" /var/run/postgresql \
 && chmod 700 "$PGDATA" && chmod 2775 /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME ["/var/lib/postgresql/data"]
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
