"""mypy --strict on the in-container agent, staged exactly as the task image stages it.

The agent (``sandbox_image/agent/``) is not a package of this project: it imports its
analyzer as ``sandbox_agent.analyzer_core``, a file that exists only once the image
build has copied ``runner/analyzer/core.py`` in. So it cannot be type-checked where it
lies. This stages it into a temporary folder with the image build's own function
(``runner.sandbox.bundle.stage_agent``) and runs mypy there:

- ``--strict``, as on ``runner/``;
- ``--no-site-packages``: the agent is standard-library code (it runs in the task
  image, where nothing else is installed), so an import of ``runner``, pydantic or any
  other installed package is reported as an error instead of being resolved;
- ``--python-version 3.11``: the oldest Python the images may carry (Debian bookworm's).

Errors are printed with the paths of the sources (``sandbox_image/agent/...``,
``runner/analyzer/core.py``), not of the staging folder. Exit status: mypy's.
Run by ``make types`` (and so by ``make check``); usage: ``python scripts/typecheck_agent.py``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from runner.sandbox.bundle import agent_sources, stage_agent
from runner.settings import PROJECT_ROOT

IMAGE_DIR = PROJECT_ROOT / "sandbox_image"
PYTHON_VERSION = "3.11"


def source_path(staged: str, sources: dict[str, Path]) -> str:
    """The path, relative to the project, of the source a staged file was copied from."""
    source = sources.get(staged)
    if source is None:
        return staged
    try:
        return str(source.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(source)


def readable(output: str, sources: dict[str, Path]) -> str:
    """mypy's output with every staged path (``path:line: ...``) shown as its source."""
    lines = []
    for line in output.splitlines():
        staged, colon, rest = line.partition(":")
        lines.append(source_path(staged, sources) + colon + rest if colon else line)
    return "\n".join(lines)


def main() -> int:
    sources = agent_sources(IMAGE_DIR)
    with tempfile.TemporaryDirectory(prefix="agent-types-") as staging:
        stage_agent(IMAGE_DIR, Path(staging))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "mypy",
                "--strict",
                "--no-site-packages",
                "--python-version",
                PYTHON_VERSION,
                # One cache across runs, outside the throw-away staging folder.
                "--cache-dir",
                str(PROJECT_ROOT / ".mypy_cache" / "agent"),
                *sorted(sources),
            ],
            cwd=staging,
            capture_output=True,
            text=True,
            check=False,
        )
    print("mypy --strict on the agent, staged with its analyzer core:")
    print(readable(done.stdout + done.stderr, sources))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
