"""Settings: n8n's variable names and semantics, our own knobs, fail-fast validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from runner.policy import EffectivePolicy, load_policy
from runner.settings import Settings

# Settings read from the environment: none of the developer's own (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("clean_env")


def effective(settings: Settings) -> EffectivePolicy:
    """The policy bundle in policies/ with ``settings`` applied."""
    return load_policy(settings)


def test_defaults_come_from_the_policy_bundle() -> None:
    settings = Settings()
    # Unset in settings: the bundle (policies/sandbox.toml) decides.
    assert settings.task_timeout_s is None
    assert settings.stdlib_allow is None
    assert settings.memory_mb is None
    policy = effective(settings)
    assert policy.limits.timeout_s == 60
    assert "json" in policy.import_policy.stdlib_allow
    assert "os" not in policy.import_policy.stdlib_allow
    assert policy.import_policy.external_allow == frozenset()
    assert settings.block_env_access is True
    assert "eval" in policy.guards.builtins_deny
    assert "open" in policy.guards.builtins_deny
    assert policy.limits.memory_bytes == 256 * 1024 * 1024
    assert policy.limits.pids == 64


def test_n8n_names_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("N8N_RUNNERS_TASK_TIMEOUT", "7")
    monkeypatch.setenv("N8N_RUNNERS_STDLIB_ALLOW", " json , re ,")
    monkeypatch.setenv("N8N_RUNNERS_EXTERNAL_ALLOW", "*")
    monkeypatch.setenv("N8N_RUNNERS_BUILTINS_DENY", "eval, exec")
    settings = Settings()
    assert settings.task_timeout_s == 7
    policy = effective(settings)
    assert policy.limits.timeout_s == 7
    assert policy.import_policy.stdlib_allow == frozenset({"json", "re"})
    assert policy.import_policy.external_allow == frozenset({"*"})
    assert policy.guards.builtins_deny == ("eval", "exec")


def test_empty_builtins_deny_denies_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("N8N_RUNNERS_BUILTINS_DENY", "")
    assert effective(Settings()).guards.builtins_deny == ()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), (" TRUE ", True), ("false", False), ("1", False), ("yes", False)],
)
def test_env_access_flag_uses_n8n_boolean_semantics(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool
) -> None:
    monkeypatch.setenv("N8N_BLOCK_RUNNER_ENV_ACCESS", raw)
    assert Settings().block_env_access is expected


def test_wildcard_must_be_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("N8N_RUNNERS_STDLIB_ALLOW", "*,os")
    with pytest.raises(
        ValidationError, match=r"Wildcard '\*' in N8N_RUNNERS_STDLIB_ALLOW must be used alone"
    ):
        Settings()


def test_timeout_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("N8N_RUNNERS_TASK_TIMEOUT", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_file_variant_is_read_when_the_variable_is_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "allow"
    secret.write_text("json,math\n")
    monkeypatch.setenv("N8N_RUNNERS_STDLIB_ALLOW_FILE", str(secret))
    assert effective(Settings()).import_policy.stdlib_allow == frozenset({"json", "math"})
    monkeypatch.setenv("N8N_RUNNERS_STDLIB_ALLOW", "re")
    # the direct variable wins
    assert effective(Settings()).import_policy.stdlib_allow == frozenset({"re"})


def test_unreadable_file_variant_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("N8N_RUNNERS_TASK_TIMEOUT_FILE", "/nonexistent/timeout")
    with pytest.raises(ValueError, match="Failed to read N8N_RUNNERS_TASK_TIMEOUT_FILE"):
        Settings()


def test_our_own_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_MEMORY_MB", "128")
    monkeypatch.setenv("SANDBOX_PIDS_LIMIT", "32")
    settings = Settings()
    assert (settings.memory_mb, settings.pids_limit) == (128, 32)


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.memory_mb = 1  # type: ignore[misc]
