"""The agent bundle: what goes into the task image, staged from the repository.

The agent is standard-library code that must never import ``runner``; the one
piece it shares with the runner, the analyzer core, is *copied* in here, so that
the container and the host run the same checks from one source file.

Owns: which files make up the agent, staging them into a folder (for the image
build context, and for running the agent as a local process in tests and
benchmarks), and a content hash of them (part of the image tag).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from runner.settings import PROJECT_ROOT

ANALYZER_CORE = PROJECT_ROOT / "runner" / "analyzer" / "core.py"
ENTRY_SCRIPT = "run.py"


def agent_sources(image_dir: Path) -> dict[str, Path]:
    """Relative path in the bundle -> source file, in a stable order."""
    agent_dir = image_dir / "agent"
    files = {ENTRY_SCRIPT: agent_dir / ENTRY_SCRIPT}
    for path in sorted((agent_dir / "sandbox_agent").glob("*.py")):
        files[f"sandbox_agent/{path.name}"] = path
    files["sandbox_agent/analyzer_core.py"] = ANALYZER_CORE
    return files


def stage_agent(image_dir: Path, dest: Path) -> Path:
    """Copy the agent bundle into ``dest``; return the path of its entry script."""
    for relative, source in agent_sources(image_dir).items():
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return dest / ENTRY_SCRIPT


def hash_files(files: dict[str, Path], digest: hashlib._Hash | None = None) -> str:
    """sha256 over names and contents, so a rename changes the hash too."""
    digest = digest or hashlib.sha256()
    for relative, source in sorted(files.items()):
        digest.update(relative.encode() + b"\0")
        digest.update(source.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()
