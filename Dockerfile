# The runner image: the sandbox-runner service itself (`serve` by default; `up`,
# `broker`, `exec`, `selfcheck` work too). Build it with `make image` (or
# `sandbox-runner image build-runner`): that bootstraps the same Debian base as the
# task image when no registry is reachable and builds the wheels on the host, so
# nothing in here talks to a package index. A plain `docker build .` does not work:
# the build context is assembled by the builder (runner/runner_image.py).
#
# Runs as a non-root user. It reaches the Docker API through a mounted socket
# (`-v /var/run/docker.sock:/var/run/docker.sock --group-add <the socket's gid>`)
# or DOCKER_HOST; the task containers it creates are siblings on that daemon and
# never get the socket (the policy linter refuses such a bundle).
#
# Task containers are made by Docker (SANDBOX_BACKEND=docker, set below: a runner
# container never changes engine by itself). The OCI backend (runc driven directly)
# is there for an operator who opts in: `-e SANDBOX_BACKEND=oci` with root, privileges
# and the host's cgroups, as docs/operations.md ("Inside a container")
# says; runc is installed for it. Without those flags runc can do nothing here.
ARG BASE_IMAGE=sandbox-runner-base:bookworm

# --- stage 1: install the wheels into a virtualenv (pip runs from its own wheel) ---
FROM ${BASE_IMAGE} AS install
COPY wheels/ /wheels/
RUN set -eu; \
    python3 -m venv --without-pip /opt/sandbox-runner; \
    pip_wheel="$(ls /wheels/pip-*.whl)"; \
    /opt/sandbox-runner/bin/python "${pip_wheel}/pip" install --quiet --no-index \
        --no-cache-dir --disable-pip-version-check --find-links /wheels sandbox-runner; \
    /opt/sandbox-runner/bin/sandbox-runner --version; \
    chmod -R a+rX,go-w /opt/sandbox-runner

# --- stage 2: the image, without the wheels and without pip ---
FROM ${BASE_IMAGE}

ARG RUNNER_UID=10002
ARG INPUTS_HASH=unknown

# tini is PID 1 (signals reach the runner, which drains on SIGTERM); runc is the OCI
# backend's runtime (~12 MB with its package; unused unless SANDBOX_BACKEND=oci). The
# builder brings runc's package downloaded on the host (debs/), installed here without
# a network, as a real package (dpkg knows its version, so do image scanners). The
# bootstrapped base has tini; a registry base, or a host that could not download runc,
# gets them from the base's distribution (that build has a network).
COPY debs/ /tmp/debs/
RUN set -eu; \
    if ls /tmp/debs/*.deb >/dev/null 2>&1; then dpkg -i /tmp/debs/*.deb; fi; \
    rm -rf /tmp/debs; \
    missing=""; \
    command -v tini >/dev/null 2>&1 || missing="${missing} tini"; \
    command -v runc >/dev/null 2>&1 || missing="${missing} runc"; \
    if [ -n "${missing}" ]; then \
        apt-get update; \
        apt-get install -y --no-install-recommends ${missing}; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    runc --version

# The service's own user: no password, no shell. Access to the Docker socket is
# granted at run time with --group-add (the socket's gid differs per host).
# The OCI backend's state directory (SANDBOX_STATE_DIR below: unpacked task images,
# bundles, runc's state) is root's alone, not under the runner user's home: runc
# runs as root what it finds there, so no other uid may rename or replace anything
# in it. A volume mounted there starts with this owner and mode.
# The embedded broker's task store (`up`, `broker`: SANDBOX_BROKER_STORE below) is the
# runner user's own directory, 0700 (it holds tenants' code, data and results): mount a
# volume there to keep queued tasks and results across a container's restart (a named
# volume starts with this owner and mode). Without one it lives and dies with the
# container; a read-only root needs a volume or a tmpfs there.
RUN groupadd --gid "${RUNNER_UID}" runner \
 && useradd --no-log-init --uid "${RUNNER_UID}" --gid "${RUNNER_UID}" \
        --create-home --home-dir /var/lib/sandbox-runner --shell /usr/sbin/nologin runner \
 && install -d -m 0700 -o root -g root /var/lib/sandbox-runner-oci \
 && install -d -m 0700 -o "${RUNNER_UID}" -g "${RUNNER_UID}" /var/lib/sandbox-broker

COPY --from=install /opt/sandbox-runner /opt/sandbox-runner
# The policy bundle and the task image sources, where the installed runner looks for
# them (<prefix>/share/sandbox-runner; SANDBOX_POLICY_DIR / SANDBOX_IMAGE_DIR override).
COPY policies/ /opt/sandbox-runner/share/sandbox-runner/policies/
COPY sandbox_image/ /opt/sandbox-runner/share/sandbox-runner/sandbox_image/
# The virtualenv got its modes in the install stage (COPY --from keeps them): a chmod
# of it here would copy all of it into one more layer (~30 MB).
RUN chmod -R a+rX,go-w /opt/sandbox-runner/share \
 && find / -xdev -perm /6000 -type f -exec chmod a-s {} +

# The health-check server (and /metrics) listens on all interfaces of the container,
# so the HEALTHCHECK below, a compose healthcheck and Prometheus can reach it.
# SANDBOX_BACKEND=docker, not the settings' auto: in a container started with the
# OCI backend's flags, auto would take it without the operator having said so.
ENV PATH=/opt/sandbox-runner/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    N8N_RUNNERS_HEALTH_CHECK_SERVER_ENABLED=true \
    N8N_RUNNERS_HEALTH_CHECK_SERVER_HOST=0.0.0.0 \
    N8N_RUNNERS_HEALTH_CHECK_SERVER_PORT=5681 \
    SANDBOX_BACKEND=docker \
    SANDBOX_STATE_DIR=/var/lib/sandbox-runner-oci \
    SANDBOX_BROKER_STORE=sqlite:////var/lib/sandbox-broker/broker-tasks.sqlite3

LABEL org.opencontainers.image.title="sandbox-runner" \
      org.opencontainers.image.description="Runs untrusted Python for a broker (n8n or the embedded one), each task in its own hardened container" \
      io.sandbox-runner.role="runner" \
      io.sandbox-runner.inputs-hash="${INPUTS_HASH}"

# 5681: health check and /metrics of `serve`; 5679: the broker of `broker` / `up`.
EXPOSE 5681 5679
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sandbox-runner", "healthcheck"]

USER ${RUNNER_UID}:${RUNNER_UID}
WORKDIR /var/lib/sandbox-runner
ENTRYPOINT ["tini", "--", "sandbox-runner"]
CMD ["serve"]
