"""CLI polish and observability plumbing: --help and --version, JSON logs with task
ids, the health check command, the runner image's inputs, where an installed runner
finds its policy bundle, and how the testcontainers module finds the Docker socket."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from runner import __version__, settings
from runner.cli import main
from runner.logs import JsonFormatter, current_log_format, setup_logging, task_context
from runner.runner_image import RunnerImageRecipe


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


ALL_COMMANDS = sorted(_commands(main))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The CLI installs a root handler; leave the root logger as the test found it."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    current_log_format.set("text")


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"sandbox-runner, version {__version__}"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(main, [*command, flag])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("Usage: "), result.output
        docstring_line = result.output.split("\n\n")[1].strip()
        assert docstring_line, f"{' '.join(command)} has no description"


def test_the_commands_this_issue_added_are_listed() -> None:
    assert ("healthcheck",) in ALL_COMMANDS
    assert ("image", "build-runner") in ALL_COMMANDS
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert "--log-format [text|json]" in help_text
    assert "SANDBOX_LOG_FORMAT" in help_text


# -- logs -------------------------------------------------------------------------------


def _record(name: str, message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_the_task_id_of_the_running_task() -> None:
    formatter = JsonFormatter()
    with task_context("task-42"):
        line = json.loads(formatter.format(_record("runner.sandbox.docker", "retrying")))
    assert line["taskId"] == "task-42"
    assert line["level"] == "warning"
    assert line["logger"] == "runner.sandbox.docker"
    assert line["message"] == "retrying"
    outside = json.loads(formatter.format(_record("runner", "idle")))
    assert "taskId" not in outside


def test_json_audit_line_is_the_record_itself_not_a_string_in_it() -> None:
    audit = {"event": "task_completed", "taskId": "t1", "outcome": "success"}
    line = json.loads(JsonFormatter().format(_record("runner.audit", json.dumps(audit))))
    assert line["event"] == "task_completed"
    assert line["taskId"] == "t1"
    assert line["outcome"] == "success"
    assert "message" not in line


def test_json_lines_keep_extras() -> None:
    line = json.loads(JsonFormatter().format(_record("runner", "x", runnerId="r1")))
    assert line["runnerId"] == "r1"


def test_text_format_names_the_task(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    setup_logging(level=logging.INFO, log_format="text", stream=stream)
    with task_context("abc"):
        logging.getLogger("runner.test").info("container set-up failed")
    logging.getLogger("runner.test").info("no task here")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("INFO runner.test [task abc]: container set-up failed")
    assert lines[1].endswith("INFO runner.test: no task here")


def test_log_format_json_from_the_command_line_and_the_environment() -> None:
    root = logging.getLogger()
    CliRunner().invoke(main, ["--log-format", "json", "healthcheck", "--help"])
    handlers = [h for h in root.handlers if h.get_name() == "sandbox-runner"]
    assert len(handlers) == 1
    assert isinstance(handlers[0].formatter, JsonFormatter)
    CliRunner().invoke(main, ["healthcheck", "--help"], env={"SANDBOX_LOG_FORMAT": "text"})
    handlers = [h for h in root.handlers if h.get_name() == "sandbox-runner"]
    assert len(handlers) == 1
    assert not isinstance(handlers[0].formatter, JsonFormatter)
    bad = CliRunner().invoke(main, ["--log-format", "xml", "healthcheck"])
    assert bad.exit_code == 2


# -- healthcheck -------------------------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_passes_when_one_endpoint_answers(health_server: str) -> None:
    result = CliRunner().invoke(
        main,
        ["healthcheck", "--url", "http://127.0.0.1:1/healthz", "--url", health_server + "/healthz"],
    )
    assert result.exit_code == 0, result.output
    assert f"healthy: {health_server}/healthz" in result.output


def test_healthcheck_fails_when_none_answers(health_server: str) -> None:
    result = CliRunner().invoke(main, ["healthcheck", "--url", health_server + "/nope"])
    assert result.exit_code == 1
    assert "unhealthy" in result.output


def test_healthcheck_probes_the_configured_ports(health_server: str) -> None:
    port = health_server.rsplit(":", 1)[1]
    env = {
        "N8N_RUNNERS_HEALTH_CHECK_SERVER_ENABLED": "true",
        "N8N_RUNNERS_HEALTH_CHECK_SERVER_HOST": "0.0.0.0",
        "N8N_RUNNERS_HEALTH_CHECK_SERVER_PORT": port,
    }
    result = CliRunner().invoke(main, ["healthcheck", "--timeout", "1"], env=env)
    assert result.exit_code == 0, result.output
    assert f"healthy: http://127.0.0.1:{port}/healthz" in result.output


# -- runner image inputs -----------------------------------------------------------------


def _project(root: Path) -> Path:
    for relative, text in {
        "Dockerfile": "FROM base\n",
        "pyproject.toml": "[project]\n",
        "README.md": "prose\n",
        "runner/__init__.py": "",
        "policies/sandbox.toml": "[limits]\n",
        "sandbox_image/Dockerfile": "FROM base\n",
    }.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_runner_image_tag_follows_its_inputs_only(tmp_path: Path) -> None:
    recipe = RunnerImageRecipe(_project(tmp_path))
    tag = recipe.tag("sha256:base")
    assert tag.startswith("sandbox-runner:")
    assert "README.md" not in recipe.inputs()
    (tmp_path / "README.md").write_text("more prose\n")
    (tmp_path / "runner" / "__pycache__").mkdir()
    (tmp_path / "runner" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert recipe.tag("sha256:base") == tag
    assert recipe.tag("sha256:other-base") != tag
    (tmp_path / "policies" / "sandbox.toml").write_text("[limits]\n# changed\n")
    assert recipe.tag("sha256:base") != tag


def test_runner_image_needs_a_checkout(tmp_path: Path) -> None:
    from runner.errors import ImageBuildError

    with pytest.raises(ImageBuildError, match="not a sandbox-runner source checkout"):
        RunnerImageRecipe(tmp_path).inputs()


# -- an installed runner finds its data ----------------------------------------------------


def test_installed_runner_looks_under_its_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings._data_root() == settings.PROJECT_ROOT  # a checkout: next to runner/
    monkeypatch.setattr(settings, "PROJECT_ROOT", Path("/nonexistent/site-packages"))
    assert settings._data_root() == Path(sys.prefix) / "share" / "sandbox-runner"


def test_policy_dir_env_overrides_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_POLICY_DIR", "/etc/sandbox-runner/policies")
    assert settings.Settings().policy_dir == Path("/etc/sandbox-runner/policies")


# -- testcontainers: where the Docker socket is ----------------------------------------------


@pytest.mark.parametrize(
    ("docker_host", "expected"),
    [
        (None, ("/var/run/docker.sock", {})),
        ("unix:///run/user/1000/docker.sock", ("/run/user/1000/docker.sock", {})),
        ("tcp://10.0.0.5:2375", (None, {"DOCKER_HOST": "tcp://10.0.0.5:2375"})),
    ],
)
def test_docker_socket(
    monkeypatch: pytest.MonkeyPatch,
    docker_host: str | None,
    expected: tuple[str | None, dict[str, str]],
) -> None:
    from runner.testing import docker_socket

    if docker_host is None:
        monkeypatch.delenv("DOCKER_HOST", raising=False)
    else:
        monkeypatch.setenv("DOCKER_HOST", docker_host)
    assert docker_socket() == expected


def test_image_progress_follows_the_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from runner.cli.support import progress

    async def from_a_worker_thread() -> None:
        await asyncio.to_thread(progress, "building task image")

    stream = io.StringIO()
    setup_logging(level=logging.WARNING, log_format="json", stream=stream)
    asyncio.run(from_a_worker_thread())
    line = json.loads(capsys.readouterr().err)
    assert line["logger"] == "runner.image"
    assert line["message"] == "building task image"
    assert line["elapsedS"] >= 0
    setup_logging(level=logging.WARNING, log_format="text", stream=stream)
    asyncio.run(from_a_worker_thread())
    assert capsys.readouterr().err.startswith("[image 0.")


def test_pretty_output_is_for_people() -> None:
    from runner.cli.exec import render_pretty

    audit = {
        "containerId": "0123456789abcdef0123",
        "durationsMs": {"total": 31.4, "containerSetup": 1.2, "run": 20.0},
        "details": {"containerStart": "warm"},
    }
    document = {"status": "success", "result": [{"json": {"n": 1}}], "prints": [["'hi'", "3"]]}
    text = render_pretty({**document, "audit": audit})
    assert text.splitlines()[0] == "print: 'hi' 3"
    assert '"n": 1' in text
    assert text.endswith("took 31 ms (warm container 0123456789ab: set-up 1 ms, run 20 ms)")
    rejected = {
        "status": "error",
        "error": {
            "code": "security_violation",
            "stage": "analyze",
            "message": "Security violations detected",
            "description": "Line 1: ...",
        },
        "prints": [],
        "audit": {"containerId": None, "durationsMs": {"total": 0.2}, "details": {}},
    }
    lines = render_pretty(rejected).splitlines()
    assert lines[0] == "error [security_violation at analyze]: Security violations detected"
    assert lines[-1] == "took 0 ms (no container: stopped by the analyzer)"


def test_status_lines_follow_the_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    from runner.cli.support import say

    setup_logging(level=logging.WARNING, log_format="json", stream=io.StringIO())
    say("broker listening on http://127.0.0.1:5679")
    line = json.loads(capsys.readouterr().err)
    assert line == {
        **line,
        "logger": "runner.cli",
        "message": "broker listening on http://127.0.0.1:5679",
    }
    setup_logging(level=logging.WARNING, log_format="text", stream=io.StringIO())
    say("broker listening on http://127.0.0.1:5679")
    assert capsys.readouterr().err == "broker listening on http://127.0.0.1:5679\n"
