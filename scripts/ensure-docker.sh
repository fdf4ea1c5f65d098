#!/usr/bin/env bash
# Make sure a Docker engine answers, and that the host has what the image build needs.
#
# - `docker info` works: nothing to do for the engine.
# - Otherwise, as root on Debian/Ubuntu: install docker.io (and debootstrap for the
#   task image's base, apparmor_parser to compile-check the AppArmor profile, runc and
#   runsc for the OCI backend and its gVisor tier, redis-server and docker-compose for
#   the Redis task store's tests), clear
#   the pid files an uncleanly killed daemon leaves behind, start dockerd in the
#   background with its log in a file, and wait until it answers.
# - Otherwise: say exactly what is missing and fail.
set -euo pipefail

LOG=${DOCKERD_LOG:-/var/log/sandbox-runner-dockerd.log}
WAIT_S=${DOCKERD_WAIT_S:-90}
say() { printf 'setup: %s\n' "$*" >&2; }

is_root_debian() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

install_missing() {
    local packages=()
    command -v dockerd >/dev/null 2>&1 || packages+=(docker.io)
    command -v debootstrap >/dev/null 2>&1 || packages+=(debootstrap)
    command -v apparmor_parser >/dev/null 2>&1 || packages+=(apparmor)
    # The OCI backend drives runc (it comes with docker.io) directly; runsc is the
    # gVisor tier.
    command -v runc >/dev/null 2>&1 || packages+=(runc)
    command -v runsc >/dev/null 2>&1 || packages+=(runsc)
    # The Redis task store's tests start their own redis-server (never a service);
    # docker-compose brings up docs/operations.md's deployment in a test.
    command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
    command -v docker-compose >/dev/null 2>&1 || packages+=(docker-compose)
    [ ${#packages[@]} -eq 0 ] && return 0
    say "installing ${packages[*]} from the Debian archive"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
    fi
}

engine_answers() { docker info >/dev/null 2>&1; }

clear_stale_pid_files() {
    local pidfile pid
    for pidfile in /var/run/docker.pid /run/docker/containerd/containerd.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
            say "removing stale $pidfile (pid ${pid:-?} is gone)"
            rm -f "$pidfile"
        fi
    done
}

if is_root_debian; then
    install_missing
fi

if engine_answers; then
    say "Docker engine is running"
    exit 0
fi

if ! is_root_debian; then
    if ! command -v dockerd >/dev/null 2>&1; then
        say "no Docker engine answers and dockerd is not installed."
    else
        say "no Docker engine answers."
    fi
    say "Start a Docker engine (or point DOCKER_HOST at one) and run again;"
    say "on Debian as root, this script installs docker.io and starts dockerd itself."
    exit 1
fi

if pgrep -x dockerd >/dev/null 2>&1; then
    say "a dockerd process exists but does not answer; waiting for it"
else
    clear_stale_pid_files
    say "starting dockerd in the background (log: $LOG)"
    mkdir -p "$(dirname "$LOG")"
    nohup setsid dockerd >>"$LOG" 2>&1 </dev/null &
fi

for _ in $(seq "$WAIT_S"); do
    if engine_answers; then
        say "Docker engine is up ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
        exit 0
    fi
    sleep 1
done
say "dockerd did not answer within ${WAIT_S}s; last lines of $LOG:"
tail -n 20 "$LOG" >&2 || true
exit 1
