"""One vocabulary of errors: the codes the docs promise are :class:`ErrorCode`, every
code the runner produces is one, and every exception class lives in runner/errors.py.

docs/protocol.md's "Error codes" paragraph is the reference: it lists every member.
README's "Error codes" paragraph is a summary: whatever code it names is a member.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from runner import errors
from runner.cli.app import main
from runner.sandbox.base import ErrorCode, Outcome, Stage
from runner.settings import PROJECT_ROOT

PROTOCOL = PROJECT_ROOT / "docs" / "protocol.md"
README = PROJECT_ROOT / "README.md"

# Words in backquotes in those paragraphs that are not error codes: stages, commands,
# and the result document's own words.
NOT_CODES = {stage.value for stage in Stage} | set(main.commands) | {"audit", "null"}

# Exceptions that are not the runner's vocabulary, each for the reason errors.py gives.
OUTSIDE_ERRORS = {
    "runner.sandbox.oci.runtime.RuntimeFailure",  # the OCI adapter's, translated at its edge
    "runner.broker_server.schemas._OverBudget",  # control flow inside one metering call
    # A shared store's refusal, turned into TenantBacklogFull by the core at once.
    "runner.broker_server.store.TenantFull",
    "runner.testing.client.SandboxServiceError",  # the test helpers', raised in a user's process
}


def error_codes_paragraph(path: Path) -> str:
    """The one paragraph of ``path`` that starts with "Error codes:"."""
    paragraphs = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
    (found,) = [p for p in paragraphs if p.startswith("Error codes:")]
    return found


def codes_named(paragraph: str) -> set[str]:
    words = re.findall(r"`([^`]+)`", paragraph)
    return {word for word in words if re.fullmatch(r"[a-z][a-z_]*", word)} - NOT_CODES


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda code: code.value)
def test_the_protocol_docs_list_every_error_code(code: ErrorCode) -> None:
    assert f"`{code.value}`" in error_codes_paragraph(PROTOCOL), (
        f"{code.value} is an ErrorCode that docs/protocol.md's 'Error codes' does not list"
    )


@pytest.mark.parametrize("path", [PROTOCOL, README], ids=["docs/protocol.md", "README.md"])
def test_every_code_the_docs_name_is_an_error_code(path: Path) -> None:
    named = codes_named(error_codes_paragraph(path))
    assert named  # the paragraph was found and read
    assert named - {code.value for code in ErrorCode} == set()


def test_every_failure_outcome_is_an_error_code_of_the_same_name() -> None:
    for outcome in Outcome:
        if outcome.is_success:
            continue
        assert outcome.error_code.value == outcome.value
        assert ErrorCode[outcome.name] is outcome.error_code


def fault_classes() -> list[type[errors.RunnerError]]:
    return [
        cls
        for cls in vars(errors).values()
        if inspect.isclass(cls) and issubclass(cls, errors.RunnerError)
    ]


def test_every_fault_class_has_a_code_of_its_own_from_the_vocabulary() -> None:
    codes = {cls.__name__: cls.code for cls in fault_classes()}
    assert len(codes) >= 12
    assert set(codes.values()) <= {code.value for code in ErrorCode}
    assert len(set(codes.values())) == len(codes), "two fault classes share a code"


def runner_modules() -> list[str]:
    """Every module of runner/ by its file (``runner.sandbox`` is a namespace package,
    which pkgutil does not walk)."""
    names = []
    for path in sorted((PROJECT_ROOT / "runner").rglob("*.py")):
        parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_exception_class_of_the_runner_is_in_errors() -> None:
    elsewhere = []
    for name in runner_modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and name != "runner.errors"
            ):
                elsewhere.append(f"{name}.{value.__qualname__}")
    assert sorted(set(elsewhere) - OUTSIDE_ERRORS) == []
    assert set(elsewhere) == OUTSIDE_ERRORS  # each exemption still exists


@pytest.mark.parametrize(
    "path",
    [
        PROJECT_ROOT / "runner" / "service.py",
        *(PROJECT_ROOT / "runner" / "broker_server").glob("*.py"),
    ],
    ids=lambda path: str(path.relative_to(PROJECT_ROOT)),
)
def test_no_error_code_is_spelled_out_where_codes_are_produced(path: Path) -> None:
    codes = {code.value for code in ErrorCode}
    spelled = [
        f"{path.name}:{node.lineno} {node.value!r}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in codes
    ]
    assert spelled == []
