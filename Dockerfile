# Bulkhead: one static binary on an empty base image.
#
#   docker build -t bulkhead .
#   docker run -p 8000:8000 -e MODEL_ENDPOINT=https://api.openai.com/v1 \
#     -e OPENAI_API_KEY_FILE=/run/secrets/openai_api_key bulkhead

# ---- dependencies, cached apart from the source (cargo-chef) ----
FROM rust:1.95.0-slim-bookworm AS chef
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl \
 && cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --release --target x86_64-unknown-linux-musl --package bulkhead --recipe-path recipe.json
COPY . .
RUN cargo build --release --target x86_64-unknown-linux-musl --package bulkhead \
 && cp target/x86_64-unknown-linux-musl/release/bulkhead /bulkhead \
 && mkdir -p /rootfs/data /rootfs/tmp /rootfs/run/bulkhead-egress \
 && chown 65532:65532 /rootfs/data /rootfs/run/bulkhead-egress \
 && chmod 1777 /rootfs/tmp

# ---- runtime: nothing but the binary, CA certificates and a data folder ----
FROM scratch
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /rootfs/ /
COPY --from=builder /bulkhead /bulkhead
ENV AGENT_MODE=production \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATABASE_URL=sqlite:///data/bulkhead.db \
    SANDBOX_ROOT=/data/sandboxes \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# Every half second (0.5s: hadolint reads no "ms"): Docker runs the first
# check one interval after the start, and engines before 25 have no
# --start-interval to check faster while starting.
HEALTHCHECK --interval=0.5s --timeout=2s --start-period=10s --retries=3 \
  CMD ["/bulkhead", "healthcheck"]
LABEL org.opencontainers.image.title="bulkhead" \
      org.opencontainers.image.description="A container-native AI agent server" \
      org.opencontainers.image.source="https://github.com/bulkhead-dev/bulkhead" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/bulkhead"]
CMD ["serve"]
