"""docs/ and examples/n8n stay true: links resolve, variables exist, metrics are real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runner.metrics import BrokerMetrics, CollectorRegistry, RunnerMetrics
from runner.settings import Settings, _env_names

ROOT = Path(__file__).resolve().parents[2]
# docs/security.md has its own owner and checks.
PAGES = sorted(
    [
        *(p for p in (ROOT / "docs").glob("*.md") if p.name != "security.md"),
        ROOT / "examples" / "n8n" / "README.md",
        ROOT / "README.md",
    ]
)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _known_variables() -> set[str]:
    names = set()
    for field_name, field in Settings.model_fields.items():
        names.update(_env_names(field_name, field))
    return names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_the_docs_index_pages_exist_and_security_is_linked_not_owned() -> None:
    for name in ("architecture", "protocol", "settings", "operations", "testing"):
        assert (ROOT / "docs" / f"{name}.md").is_file()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/security.md" in readme


def test_compose_example_uses_real_runner_variables() -> None:
    compose = (ROOT / "examples" / "n8n" / "docker-compose.yml").read_text(encoding="utf-8")
    runner_part = compose.split("  sandbox-runner:", 1)[1]
    used = set(re.findall(r"^\s+((?:N8N|SANDBOX)_[A-Z_]+):", runner_part, re.M))
    assert used, "the runner service sets no variables?"
    unknown = used - _known_variables()
    assert not unknown, f"not settings of the runner: {unknown}"
    assert "/var/run/docker.sock:/var/run/docker.sock" in runner_part
    assert "group_add" in runner_part


def test_every_metric_the_docs_name_exists() -> None:
    registry = CollectorRegistry()
    RunnerMetrics(registry)
    BrokerMetrics(registry).watch(lambda: {})
    exposed = {metric.name for metric in registry.collect()}
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`(sandbox_(?:runner|broker)_[a-z_]+)`", text))
    for name in documented:
        base = re.sub(r"_(total|info)$", "", name)
        assert base in exposed, f"docs/operations.md names {name}, which does not exist"
    for name in exposed:
        assert any(d.startswith(name) for d in documented) or name.startswith(
            ("sandbox_broker_open", "sandbox_broker_queued", "sandbox_broker_running")
        ), f"metric {name} is not documented"
