#!/usr/bin/env bash
# `make demo`: run each example through the whole pipeline and show its result.
# A task that fails (exit code 1) is part of the demo; a runner fault (2) is not.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=.venv/bin/sandbox-runner
status=0

run() {
    local title=$1; shift
    printf '\n\033[1m== %s\033[0m\n$ sandbox-runner exec %s\n' "$title" "$*"
    "$RUN" exec "$@"
    local code=$?
    printf '(exit code %d)\n' "$code"
    [ "$code" -le 1 ] || status=1
}

run "All items: one run over every item"        examples/all_items.py --items examples/items.json --pretty
run "Per item, with filtering (None drops one)"  examples/per_item_filter.py --items examples/items.json --mode per_item --pretty
run "A task that prints"                        examples/prints.py --items examples/items.json --pretty
run "Rejected by the analyzer (no container)"   examples/rejected.py --pretty
run "Timeout: an endless loop, killed after 2s" examples/timeout.py --timeout 2 --pretty
run "The same all-items task, as JSON (what programs read)" examples/all_items.py --items examples/items.json
exit $status
