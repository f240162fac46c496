# A local stand-in for the official rust:1.95.0-slim-bookworm image, for
# machines without a registry (scripts/ensure-images builds it). Same
# layout as the official image: rustup in /usr/local/cargo/bin, toolchains
# in /usr/local/rustup. The toolchain is this machine's own, copied in; the
# CA certificates are this machine's too, so that builds reach crates.io
# through whatever TLS proxy the machine trusts.
FROM debian:12.15-slim
# checkov:skip=CKV_DOCKER_2: a build-stage base image, never run as a service
# checkov:skip=CKV_DOCKER_3: a build-stage base image: the build runs as root, as the official rust image does
# Unpinned like the official image it stands in for: glibc's development
# files follow Debian's security updates, and old versions leave the archive.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUST_VERSION=1.95.0
COPY rustup /usr/local/cargo/bin/rustup
COPY toolchain/ /usr/local/rustup/toolchains/1.95.0-x86_64-unknown-linux-gnu/
RUN printf 'version = "12"\ndefault_toolchain = "1.95.0-x86_64-unknown-linux-gnu"\nprofile = "minimal"\n' > /usr/local/rustup/settings.toml \
 && for tool in cargo rustc rustdoc; do ln -s rustup /usr/local/cargo/bin/$tool; done \
 && chmod -R a+w /usr/local/rustup /usr/local/cargo \
 && cargo --version && rustc --version
