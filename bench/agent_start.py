"""What the in-container agent's start costs, in CPU, inside the real task image.

``python -m bench.agent_start [--baseline REF] [--runs N]`` (not part of ``make bench``):
one container of the task image (network none, read-only root, tmpfs /tmp, all
capabilities dropped, no-new-privileges, our seccomp profile, the sandbox user) runs
:mod:`bench.agent_start_probe`, which starts the image's interpreter with the agent N
times and takes each start's CPU (user + sys) from ``wait4``: the interpreter alone,
the interpreter plus the agent's imports, and the whole agent on a small task (a
success and a user error), its forked task child included. Then ``-X importtime``
of the agent on each task, the top modules by their own import time.

Two bundles side by side, measured in the same container, round-robin:

- ``image``: the agent as the image holds it (``/opt/sandbox-agent``, compiled at
  build time) with the interpreter flags and arguments of the image's entrypoint;
- ``--baseline REF``: the agent and analyzer core of that git commit, staged as the
  image build stages them, compiled with ``compileall`` by the image's interpreter
  (as the Dockerfile has always done), run with the flags of that commit's
  Dockerfile ``ENTRYPOINT``.

The same interpreter and standard library run both, so the difference is the
agent's own. Nothing asserts on time; ``--json PATH`` keeps the raw samples.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker

from bench.bare import BENCH_OWNER
from bench.stats import percentile
from runner.analyzer import DEFAULT_BUILTINS_DENY
from runner.cli.wiring import image_recipe, load_isolation
from runner.sandbox.base import GuardConfig, Limits, Mode, TaskSpec
from runner.sandbox.envelope import encode_task
from runner.sandbox.image import ImageBuilder
from runner.sandbox.labels import LABEL_DEADLINE, LABEL_MANAGED, LABEL_OWNER
from runner.settings import PROJECT_ROOT, Settings

HERE = Path(__file__).resolve().parent
PROBE = HERE / "agent_start_probe.py"
BASELINE_DIR = "/opt/baseline-agent"
VALUES = list(range(1000))
TASKS = {
    # The task of ``make bench``: sum 1,000 ints, JSON in and JSON out.
    "sum": "return [{'json': {'sum': sum(_items[0]['json']['values'])}}]",
    # A user error: the child formats the user's traceback.
    "user_error": "x = _items[0]['json']['values']\nraise ValueError(len(x))",
}
EXPECTED = {"sum": "success", "user_error": "error:user_error"}
MEASURES = ("interpreter", "imports", *(f"task:{name}" for name in TASKS))
_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def encoded_task(code: str) -> bytes:
    spec = TaskSpec(
        task_id="agent-start",
        code=code,
        mode=Mode.ALL_ITEMS,
        items=[{"json": {"values": VALUES}}],
        guards=GuardConfig(stdlib_allow=(), external_allow=(), builtins_deny=DEFAULT_BUILTINS_DENY),
    )
    return encode_task(spec, Limits())


def entrypoint_parts(entrypoint: list[str]) -> tuple[list[str], str, list[str]]:
    """(interpreter flags, the agent's folder, the agent's arguments) of an entrypoint
    ``[..., python3, FLAGS..., <folder>/run.py, ARGS...]``."""
    python = next(i for i, part in enumerate(entrypoint) if part.startswith("python3"))
    script = next(i for i, part in enumerate(entrypoint) if part.endswith("/run.py"))
    folder = entrypoint[script].rsplit("/", 1)[0]
    return entrypoint[python + 1 : script], folder, entrypoint[script + 1 :]


def git_show(ref: str, path: str) -> bytes:
    return subprocess.run(
        ["git", "show", f"{ref}:{path}"], cwd=PROJECT_ROOT, capture_output=True, check=True
    ).stdout


def stage_baseline(ref: str, dest: Path) -> list[str]:
    """The agent bundle of commit ``ref`` in ``dest``, as ``stage_agent`` lays it out;
    returns that commit's Dockerfile ENTRYPOINT."""
    listing = subprocess.run(
        ["git", "ls-tree", "--name-only", ref, "sandbox_image/agent/sandbox_agent/"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    files = {"run.py": "sandbox_image/agent/run.py"}
    files.update({f"sandbox_agent/{Path(p).name}": p for p in listing if p.endswith(".py")})
    files["sandbox_agent/analyzer_core.py"] = "runner/analyzer/core.py"
    for relative, source in files.items():
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(git_show(ref, source))
    dockerfile = git_show(ref, "sandbox_image/Dockerfile").decode()
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile, re.M)
    if match is None:
        raise SystemExit(f"no ENTRYPOINT in {ref}:sandbox_image/Dockerfile")
    entrypoint: list[str] = json.loads(match.group(1))
    return entrypoint


def container_kwargs(settings: Settings, mounts: dict[str, dict[str, str]]) -> dict[str, Any]:
    isolation = load_isolation(settings)
    return {
        "labels": {
            LABEL_MANAGED: "true",
            LABEL_OWNER: BENCH_OWNER,
            LABEL_DEADLINE: f"{time.time() + 1800:.0f}",
        },
        "volumes": mounts,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": "rw,noexec,nosuid,nodev,size=16m,mode=1777"},  # noqa: S108
        "cap_drop": ["ALL"],
        "security_opt": isolation.security_opt(),
        "ipc_mode": "none",
    }


def run_container(
    client: docker.DockerClient, image: str, command: list[str], **kwargs: Any
) -> bytes:
    container = client.containers.create(image, entrypoint=command, **kwargs)
    try:
        container.start()
        status = container.wait()
        out: bytes = container.logs(stdout=True, stderr=False)
        if status.get("StatusCode") != 0:
            err = container.logs(stdout=False, stderr=True).decode(errors="replace")
            raise SystemExit(f"{command[:3]} failed in the container:\n{err[-4000:]}")
        return out
    finally:
        container.remove(force=True)


def import_table(outputs: list[str]) -> tuple[dict[str, dict[str, float]], float]:
    """Per module: the least self and cumulative import time (µs) over the runs; and the
    least sum of the self times after the interpreter's own start (the imports of
    ``run.py``, the agent and its child: everything after ``site``).

    The least, not the median: ``-X importtime`` counts wall time, which anything else
    running on the machine stretches; the least of several runs is the closest to the
    work itself."""
    runs: list[dict[str, tuple[int, int]]] = []
    after_start: list[float] = []
    for text in outputs:
        seen: dict[str, tuple[int, int]] = {}
        total_us, started = 0, False
        for line in text.splitlines():
            match = _IMPORT_LINE.match(line)
            if not match:
                continue
            self_us, cumulative_us = int(match[1]), int(match[2])
            if started:
                total_us += self_us
            elif match[4] == "site" and not match[3].strip():
                started = True
            # A module the child imports again after its purge of sys.modules is
            # paid twice: both count.
            was_self, was_cumulative = seen.get(match[4], (0, 0))
            seen[match[4]] = (was_self + self_us, was_cumulative + cumulative_us)
        runs.append(seen)
        after_start.append(total_us)
    table = {}
    for name in {name for seen in runs for name in seen}:
        values = [seen[name] for seen in runs if name in seen]
        table[name] = {
            "self_us": min(v[0] for v in values),
            "cumulative_us": min(v[1] for v in values),
        }
    return table, min(after_start)


def summarize(raw: dict[str, Any], top: int) -> str:
    names = list(raw["samples"])
    lines = [
        f"Python {raw['python']}, {len(next(iter(raw['samples'].values()))['interpreter'])} "
        f"starts of each, in {raw['seconds']} s. CPU ms per start (user + sys, wait4), "
        "median [p25-p75]:",
        "",
        f"| measure | {' | '.join(names)} |",
        f"| --- |{' ---: |' * len(names)}",
    ]
    for measure in MEASURES:
        cells = []
        for name in names:
            values = raw["samples"][name][measure]
            cells.append(
                f"{percentile(values, 50):.1f} [{percentile(values, 25):.1f}-"
                f"{percentile(values, 75):.1f}]"
            )
        lines.append(f"| {measure} | {' | '.join(cells)} |")
    for task in TASKS:
        tables, after_start = {}, {}
        for name in names:
            tables[name], after_start[name] = import_table(raw["importtime"][name][task])
        lines += [
            "",
            f"-X importtime, task {task} (µs, least of {len(raw['importtime'][names[0]][task])} "
            "runs; all imports after the interpreter's start, the agent's and its "
            "child's: "
            + ", ".join(f"{name} {after_start[name]:.0f}" for name in names)
            + "), top by self time:",
            "",
            f"| module | {' | '.join(f'{n} self / cumul.' for n in names)} |",
            f"| --- |{' ---: |' * len(names)}",
        ]
        ranked = sorted(
            {module for table in tables.values() for module in table},
            key=lambda module: -max(t.get(module, {}).get("self_us", 0) for t in tables.values()),
        )
        for module in ranked[:top]:
            cells = []
            for name in names:
                row = tables[name].get(module)
                cells.append(
                    "-" if row is None else f"{row['self_us']:.0f} / {row['cumulative_us']:.0f}"
                )
            lines.append(f"| {module} | {' | '.join(cells)} |")
        if len(names) > 1:
            first, last = tables[names[0]], tables[names[-1]]
            gone = sorted(set(first) - set(last))
            new = sorted(set(last) - set(first))
            lines.append("")
            lines.append(f"not imported any more ({names[-1]} vs {names[0]}): {', '.join(gone)}")
            if new:
                lines.append(f"newly imported: {', '.join(new)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="git commit whose agent to measure beside the image's")
    parser.add_argument("--runs", type=int, default=40, help="starts per measure and bundle")
    parser.add_argument("--importtime-runs", type=int, default=7)
    parser.add_argument("--top", type=int, default=20, help="modules listed per table")
    parser.add_argument("--image", help="task image (default: built or found from the sources)")
    parser.add_argument("--json", type=Path, help="write the raw samples here")
    args = parser.parse_args(argv)

    settings = Settings()
    client = docker.from_env()
    image = args.image or ImageBuilder(client, image_recipe(settings), lambda line: None).ensure()
    flags, folder, agent_args = entrypoint_parts(
        client.images.get(image).attrs["Config"]["Entrypoint"]
    )
    with tempfile.TemporaryDirectory(prefix="agent-start-") as work:
        probe_dir, baseline_dir = Path(work) / "probe", Path(work) / "baseline"
        probe_dir.mkdir()
        (probe_dir / "probe.py").write_bytes(PROBE.read_bytes())
        tasks = {}
        for name, code in TASKS.items():
            (probe_dir / f"{name}.task").write_bytes(encoded_task(code))
            tasks[name] = f"/probe/{name}.task"
        bundles = []
        mounts = {str(probe_dir): {"bind": "/probe", "mode": "ro"}}
        if args.baseline:
            baseline_dir.mkdir()
            base_flags, _, base_args = entrypoint_parts(stage_baseline(args.baseline, baseline_dir))
            # Compiled by the image's interpreter, as the Dockerfile compiles the agent.
            run_container(
                client,
                image,
                ["python3", "-m", "compileall", "-q", BASELINE_DIR],
                user=f"{os.getuid()}:{os.getgid()}",
                volumes={str(baseline_dir): {"bind": BASELINE_DIR, "mode": "rw"}},
                network_mode="none",
            )
            mounts[str(baseline_dir)] = {"bind": BASELINE_DIR, "mode": "ro"}
            bundles.append(
                {"name": args.baseline, "dir": BASELINE_DIR, "flags": base_flags, "args": base_args}
            )
        bundles.append({"name": "image", "dir": folder, "flags": flags, "args": agent_args})
        config = {
            "runs": args.runs,
            "importtimeRuns": args.importtime_runs,
            "bundles": bundles,
            "tasks": tasks,
        }
        (probe_dir / "config.json").write_text(json.dumps(config))
        print(f"{image}: {len(bundles)} bundle(s), {args.runs} starts each ...", file=sys.stderr)
        out = run_container(
            client,
            image,
            ["python3", "-I", "/probe/probe.py", "/probe/config.json"],
            **container_kwargs(settings, mounts),
        )
    raw = json.loads(out)
    for name, results in raw["results"].items():
        for task, expected in EXPECTED.items():
            if results[f"task:{task}"] != expected:
                raise SystemExit(f"{name}: task {task} ended {results[f'task:{task}']}")
    raw["image"] = image
    raw["bundles"] = bundles
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    print(summarize(raw, args.top))


if __name__ == "__main__":
    main()
