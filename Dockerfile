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
ARG BASE_IMAGE=sandbox-runner-base:bookworm

# --- stage 1: install the wheels into a virtualenv (pip runs from its own wheel) ---
FROM ${BASE_IMAGE} AS install
COPY wheels/ /wheels/
RUN set -eu; \
    python3 -m venv --without-pip /opt/sandbox-runner; \
    pip_wheel="$(ls /wheels/pip-*.whl)"; \
    /opt/sandbox-runner/bin/python "${pip_wheel}/pip" install --quiet --no-index \
        --no-cache-dir --disable-pip-version-check --find-links /wheels sandbox-runner; \
    /opt/sandbox-runner/bin/sandbox-runner --version

# --- stage 2: the image, without the wheels and without pip ---
FROM ${BASE_IMAGE}

ARG RUNNER_UID=10002
ARG INPUTS_HASH=unknown

# tini is PID 1 (signals reach the runner, which drains on SIGTERM). The bootstrapped
# base has it; a registry base gets it from its distribution.
RUN set -eu; \
    if ! command -v tini >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends tini; \
        rm -rf /var/lib/apt/lists/*; \
    fi

# The service's own user: no password, no shell. Access to the Docker socket is
# granted at run time with --group-add (the socket's gid differs per host).
RUN groupadd --gid "${RUNNER_UID}" runner \
 && useradd --no-log-init --uid "${RUNNER_UID}" --gid "${RUNNER_UID}" \
        --create-home --home-dir /var/lib/sandbox-runner --shell /usr/sbin/nologin runner

COPY --from=install /opt/sandbox-runner /opt/sandbox-runner
# The policy bundle and the task image sources, where the installed runner looks for
# them (<prefix>/share/sandbox-runner; SANDBOX_POLICY_DIR / SANDBOX_IMAGE_DIR override).
COPY policies/ /opt/sandbox-runner/share/sandbox-runner/policies/
COPY sandbox_image/ /opt/sandbox-runner/share/sandbox-runner/sandbox_image/
RUN chmod -R a+rX,go-w /opt/sandbox-runner \
 && find / -xdev -perm /6000 -type f -exec chmod a-s {} +

# The health-check server (and /metrics) listens on all interfaces of the container,
# so the HEALTHCHECK below, a compose healthcheck and Prometheus can reach it.
ENV PATH=/opt/sandbox-runner/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    N8N_RUNNERS_HEALTH_CHECK_SERVER_ENABLED=true \
    N8N_RUNNERS_HEALTH_CHECK_SERVER_HOST=0.0.0.0 \
    N8N_RUNNERS_HEALTH_CHECK_SERVER_PORT=5681

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
