# Test only: the sandbox image with the MCP servers that bulkhead-mcp's
# tests run over stdio in a docker sandbox, at the pins scripts/ensure-tools
# installs for the namespace sandbox, and at the same path
# (/usr/local/lib/bulkhead-test-mcp/venv), so that a test names a server
# the same way on both backends. scripts/ensure-images builds it as
# bulkhead-sandbox-mcp:test; nothing ships it. Its build context holds
# this file and a `certs/` folder with the CA certificates the building
# machine trusts (empty where it needs none), so that pip reaches PyPI
# through whatever TLS proxy that machine trusts, as the Rust stand-in does.
ARG SANDBOX_IMAGE=bulkhead-sandbox:0.1
FROM ${SANDBOX_IMAGE}
# checkov:skip=CKV_DOCKER_7: the base is named by the ARG above, whose default carries the exact tag (0.1); scripts/ensure-images passes its own SANDBOX_IMAGE
# checkov:skip=CKV_DOCKER_2: like the sandbox image it extends, it runs `sleep infinity` under the backend, which checks it by running commands in it

USER 0:0
# The sandbox image's python3 without ensurepip; Debian's own package, of
# the base's point release (hadolint DL3008 off, as in the sandbox image).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates \
 && python3 -m venv /usr/local/lib/bulkhead-test-mcp/venv \
 && /usr/local/lib/bulkhead-test-mcp/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      --cert /etc/ssl/certs/ca-certificates.crt \
      mcp-server-time==2026.10.19 fastmcp==4.2.3

USER 1000:1000
WORKDIR /workspace
CMD ["sleep", "infinity"]
