"""n8n's result shapes (reference 5.3, 5.4, 5.7) and error texts (5.5), end to end
through the real agent, run as a local process (no container: these are about the
pipeline above the container boundary; the container tests are in integration/).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from runner.analyzer import DEFAULT_BUILTINS_DENY, Analyzer, ImportPolicy
from runner.pipeline import AuditContext, TaskPipeline, TaskReport, TaskRequest
from runner.policy import load_bundle
from runner.sandbox.base import GuardConfig, Limits, Mode, Outcome, Stage
from runner.sandbox.interpret import CLAIM_MESSAGE
from runner.sandbox.process import ProcessSandbox
from runner.settings import PROJECT_ROOT

Factory = Callable[..., AbstractAsyncContextManager[TaskPipeline]]
# The curated default allowlist of the policy bundle (policies/sandbox.toml).
DEFAULT_STDLIB_ALLOW = ",".join(load_bundle(PROJECT_ROOT / "policies").config.imports.stdlib_allow)


@pytest.fixture
def local_pipeline() -> Factory:
    @asynccontextmanager
    async def factory(
        *,
        stdlib: str = DEFAULT_STDLIB_ALLOW,
        external: str = "",
        deny: tuple[str, ...] = DEFAULT_BUILTINS_DENY,
        block_env: bool = True,
        timeout_s: float = 10,
        output_bytes: int = 1024 * 1024,
    ) -> AsyncIterator[TaskPipeline]:
        policy = ImportPolicy.from_env_strings(stdlib, external)
        sandbox = ProcessSandbox(PROJECT_ROOT / "sandbox_image")
        try:
            yield TaskPipeline(
                sandbox=sandbox,
                analyzer=Analyzer(policy),
                guards=GuardConfig(
                    stdlib_allow=tuple(sorted(policy.stdlib_allow)),
                    external_allow=tuple(sorted(policy.external_allow)),
                    builtins_deny=deny,
                    block_env_access=block_env,
                ),
                limits=Limits(timeout_s=timeout_s, output_bytes=output_bytes),
                context=AuditContext(runner_id="unit", image="local", image_id=None, isolation={}),
            )
        finally:
            await sandbox.aclose()

    return factory


async def run(
    factory: Factory,
    code: str,
    items: list[Any] | None = None,
    mode: Mode = Mode.ALL_ITEMS,
    continue_on_fail: bool = False,
    **options: Any,
) -> TaskReport:
    async with factory(**options) as pipeline:
        return await pipeline.run(
            TaskRequest(code=code, items=items or [], mode=mode, continue_on_fail=continue_on_fail)
        )


ITEMS = [{"json": {"a": 1}}, {"json": {"a": 2}}, {"json": {"a": 3}}]

# -- 5.3 all-items ------------------------------------------------------------------


async def test_all_items_result_is_delivered_unchanged(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "return [{'x': 1}, 5]")
    assert report.document()["status"] == "success"
    assert report.result == [{"x": 1}, 5]


async def test_all_items_no_return_is_null(local_pipeline: Factory) -> None:
    assert (await run(local_pipeline, "x = 1")).result is None


async def test_all_items_sees_items_and_query(local_pipeline: Factory) -> None:
    async with local_pipeline() as pipeline:
        report = await pipeline.run(
            TaskRequest(
                code="return [{'q': _query, 'n': len(_items)}]", items=ITEMS, query={"k": "v"}
            )
        )
    assert report.result == [{"q": {"k": "v"}, "n": 3}]


async def test_non_json_values_become_strings_and_tuples_lists(local_pipeline: Factory) -> None:
    code = (
        "import datetime, decimal\n"
        "return [{'d': datetime.date(2024, 1, 2), 'dec': decimal.Decimal('1.5'), 't': (1, 2),"
        " 's': {3}, 'b': b'x'}]"
    )
    report = await run(local_pipeline, code)
    assert report.result == [
        {"d": "2024-01-02", "dec": "1.5", "t": [1, 2], "s": "{3}", "b": "b'x'"}
    ]


async def test_nan_and_infinity_never_reach_the_wire(local_pipeline: Factory) -> None:
    report = await run(
        local_pipeline,
        "return [{'n': float('nan'), 'i': float('inf'), 'm': -float('inf'), 'ok': 1.5}]",
    )
    assert report.result == [{"n": None, "i": None, "m": None, "ok": 1.5}]
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in report.result[0].values())


# -- 5.3 per-item -------------------------------------------------------------------


async def test_per_item_wraps_with_paired_item(local_pipeline: Factory) -> None:
    report = await run(
        local_pipeline, "return {'b': _item['json']['a'] * 10}", ITEMS, Mode.PER_ITEM
    )
    assert report.result == [
        {"json": {"b": 10}, "pairedItem": {"item": 0}},
        {"json": {"b": 20}, "pairedItem": {"item": 1}},
        {"json": {"b": 30}, "pairedItem": {"item": 2}},
    ]


async def test_per_item_none_filters_and_keeps_indices(local_pipeline: Factory) -> None:
    code = "return None if _item['json']['a'] == 1 else _item['json']"
    report = await run(local_pipeline, code, ITEMS, Mode.PER_ITEM)
    assert [item["pairedItem"]["item"] for item in report.result] == [1, 2]


async def test_per_item_explicit_json_and_binary_extra_keys_dropped(
    local_pipeline: Factory,
) -> None:
    code = (
        "return {'json': {'v': 1}, 'binary': {'f': {'data': 'AA=='}}, 'extra': 1, 'pairedItem': 9}"
    )
    report = await run(local_pipeline, code, ITEMS[:1], Mode.PER_ITEM)
    assert report.result == [
        {"json": {"v": 1}, "pairedItem": {"item": 0}, "binary": {"f": {"data": "AA=="}}}
    ]


async def test_per_item_binary_only_gives_empty_json(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "return {'binary': {'f': {}}}", ITEMS[:1], Mode.PER_ITEM)
    assert report.result == [{"json": {}, "pairedItem": {"item": 0}, "binary": {"f": {}}}]


async def test_per_item_non_dict_passes_through(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "return 7", ITEMS[:1], Mode.PER_ITEM)
    assert report.result == [{"json": 7, "pairedItem": {"item": 0}}]


async def test_per_item_has_no_items_or_query(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "return {'x': _items}", ITEMS[:1], Mode.PER_ITEM)
    assert report.outcome is Outcome.USER_ERROR
    assert report.error is not None
    assert report.error.message == "name '_items' is not defined"


async def test_per_item_namespace_is_fresh_for_each_item(local_pipeline: Factory) -> None:
    code = "try:\n    seen\nexcept NameError:\n    seen = 'fresh'\nreturn {'seen': seen}"
    report = await run(local_pipeline, code, ITEMS[:2], Mode.PER_ITEM)
    assert [item["json"]["seen"] for item in report.result] == ["fresh", "fresh"]


async def test_per_item_exception_aborts_the_whole_task(local_pipeline: Factory) -> None:
    code = "if _item['json']['a'] == 2:\n    raise KeyError('k')\nreturn _item"
    report = await run(local_pipeline, code, ITEMS, Mode.PER_ITEM)
    assert report.outcome is Outcome.USER_ERROR
    assert report.result is None
    assert report.error is not None
    assert report.error.message == "'k'"


# -- 5.4 continueOnFail -------------------------------------------------------------


async def test_continue_on_fail_all_items(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "raise KeyError('k')", continue_on_fail=True)
    assert report.document()["status"] == "success"
    assert report.result == [{"json": {"error": "'k'"}}]
    assert report.audit["continueOnFailApplied"] is True
    assert report.audit["errorCode"] == "user_error"


async def test_continue_on_fail_per_item_gives_one_error_item(local_pipeline: Factory) -> None:
    code = "return {'v': 1 / (_item['json']['a'] - 2)}"
    report = await run(local_pipeline, code, ITEMS, Mode.PER_ITEM, continue_on_fail=True)
    assert report.result == [{"json": {"error": "division by zero"}}]


async def test_continue_on_fail_covers_timeout(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "while True:\n    pass", continue_on_fail=True, timeout_s=1)
    assert report.result == [{"json": {"error": "Task execution timed out after 1 second"}}]


async def test_continue_on_fail_does_not_cover_the_analyzer(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "import os", continue_on_fail=True)
    assert report.document()["status"] == "error"
    assert report.error is not None
    assert report.error.code is Outcome.SECURITY_VIOLATION
    syntax = await run(local_pipeline, "return [", continue_on_fail=True)
    assert syntax.error is not None
    assert syntax.error.code is Outcome.SYNTAX_ERROR


# -- 5.5 error texts ----------------------------------------------------------------


async def test_static_violation_texts(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "import os\nx = ().__class__", stdlib="")
    assert report.error is not None
    assert report.error.message == "Security violations detected"
    assert report.error.description == (
        "Line 1: Import of standard library module 'os' is disallowed. "
        "Allowed stdlib modules: none\n"
        "Line 2: Access to attribute '__class__' is disallowed, because it can be used to bypass "
        "security restrictions."
    )
    assert report.error.stage is Stage.ANALYZE
    assert report.audit["containerId"] is None  # rejected before any container existed


async def test_syntax_error_text_has_no_description(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "return [")
    assert report.error is not None
    assert report.error.message == "'[' was never closed (<unknown>, line 1)"
    assert report.error.has_description is False
    assert report.error.stage is Stage.ANALYZE


async def test_runtime_import_guard_text(local_pipeline: Factory) -> None:
    # A computed module name passes the static check; the runtime guard stops it.
    code = "load = __import__\nname = ''.join(['o', 's'])\nreturn load(name).getcwd()"
    report = await run(local_pipeline, code)
    assert report.error is not None
    assert report.error.code is Outcome.SECURITY_VIOLATION
    assert report.error.message == "Security violation detected"
    assert report.error.description.startswith(
        "Import of standard library module 'os' is disallowed. Allowed stdlib modules: array, "
    )
    assert report.error.stage is Stage.RUN


async def test_user_exception_message_and_user_only_traceback(local_pipeline: Factory) -> None:
    code = "x = 1\n\ndef inner():\n    raise ValueError('boom')\n\ninner()"
    report = await run(local_pipeline, code)
    assert report.error is not None
    assert report.error.code is Outcome.USER_ERROR
    assert report.error.message == "boom"
    description = report.error.description
    assert description.startswith("Traceback (most recent call last):")
    assert 'File "<all_items_task_execution>", line 6' in description
    assert 'File "<all_items_task_execution>", line 4, in inner' in description
    assert "raise ValueError('boom')" in description
    assert description.endswith("ValueError: boom")
    assert "sandbox_agent" not in description
    assert "guards" not in description


async def test_system_exit_text(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "raise SystemExit(3)")
    assert report.error is not None
    assert report.error.code is Outcome.PROCESS_EXIT
    assert report.error.message == "Process exited with code 3"


async def test_timeout_text(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "while True:\n    pass", timeout_s=2)
    assert report.error is not None
    assert report.error.code is Outcome.TIMEOUT
    assert report.error.message == "Task execution timed out after 2 seconds"


async def test_denied_builtin_text(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "return type(1)")
    assert report.error is not None
    assert report.error.message == "name 'type' is not defined"


# -- 5.7 prints ---------------------------------------------------------------------


async def test_prints_are_formatted_like_n8n(local_pipeline: Factory) -> None:
    code = (
        "print('hi', 1, {'a': [1]}, None)\n"
        "print('Hello, World!', 42, 3.14, True)\n"
        "print('unicode: ü ✓ 🎉', [], {})\n"
        "print()\n"
        "return 1"
    )
    report = await run(local_pipeline, code)
    assert report.prints == [
        ["'hi'", "1", '{"a": [1]}', "None"],
        ["'Hello, World!'", "42", "3.14", "True"],
        ["'unicode: ü ✓ 🎉'", "[]", "{}"],
        [],
    ]


async def test_prints_truncate_after_100_calls(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "for i in range(250):\n    print(i)\nreturn 1")
    assert len(report.prints) == 101
    assert report.prints[99] == ["99"]
    assert report.prints[100] == ["[Output truncated - 150 more print statements]"]


async def test_prints_are_kept_when_the_task_fails(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "print('before')\nraise RuntimeError('after')")
    assert report.error is not None
    assert report.prints == [["'before'"]]
    assert report.document()["prints"] == [["'before'"]]


# -- environment --------------------------------------------------------------------


async def test_environment_blocked_by_default(local_pipeline: Factory) -> None:
    code = "import os\nreturn {'n': len(os.environ), 'path': 'PATH' in os.environ}"
    report = await run(local_pipeline, code, stdlib="os")
    assert report.result == {"n": 0, "path": False}


async def test_environment_visible_when_allowed(local_pipeline: Factory) -> None:
    code = "import os\nreturn {'path': 'PATH' in os.environ}"
    report = await run(local_pipeline, code, stdlib="os", block_env=False)
    assert report.result == {"path": True}


# -- document -----------------------------------------------------------------------


async def test_error_document_shape(local_pipeline: Factory) -> None:
    document = (await run(local_pipeline, "raise ValueError('x')")).document()
    assert set(document) == {"status", "error", "prints", "audit"}
    assert set(document["error"]) == {"message", "description", "code", "stage"}
    assert document["error"]["code"] == "user_error"
    assert document["error"]["stage"] == "run"
    audit = document["audit"]
    for key in ("taskId", "containerId", "imageId", "limits", "isolation", "durationsMs"):
        assert key in audit
    assert {"analyze", "total"} <= set(audit["durationsMs"])


async def test_lone_surrogates_in_results_and_prints_survive(local_pipeline: Factory) -> None:
    report = await run(local_pipeline, "s = chr(0xD800)\nprint(s)\nreturn [{'s': s}]")
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.result == [{"s": "\ud800"}]
    assert report.prints == [["'\ud800'"]]


async def test_code_valid_to_the_parser_but_not_as_a_body_is_a_syntax_error(
    local_pipeline: Factory,
) -> None:
    report = await run(local_pipeline, "from __future__ import annotations\nreturn 1", stdlib="*")
    assert report.error is not None
    assert report.error.code is Outcome.SYNTAX_ERROR
    assert "__future__" in report.error.message
    # Found when the child compiles the code (as in n8n), not by an analyzer: stage run.
    assert report.error.stage is Stage.RUN


# -- frames the task writes to its own result pipe (issue: hostile tenants) ----------

# Task code that reaches ``os`` can write its own frame to the result pipe it inherits
# (its only descriptor from 3 up). The agent reads the first complete frame: the
# child's own message, sent when the code returns, comes too late to count.
FORGE = """
import json, os
body = json.dumps({message}).encode()
for fd in range(3, 64):
    try:
        os.write(fd, len(body).to_bytes(4, "big") + body)
    except OSError:
        pass
return "never seen"
"""


FLOOD = """
import os
body = b'{"result": 1, "print_args": [' + b",".join([b"[]"] * 300_000) + b"]}"
for fd in range(3, 64):
    try:
        os.write(fd, len(body).to_bytes(4, "big") + body)
    except OSError:
        pass
return "never seen"
"""


def forged(kind: str, message: str, description: str = "forged by the task") -> str:
    error = {"kind": kind, "message": message, "description": description}
    return FORGE.format(message=repr({"error": error, "print_args": [["'before'"]]}))


async def test_a_forged_analyzer_verdict_is_stage_run_and_continue_on_fail_applies(
    local_pipeline: Factory,
) -> None:
    code = forged("security_violation", "Security violations detected")
    report = await run(local_pipeline, code, stdlib="*", deny=(), continue_on_fail=True)
    # The analyzer passed this code; the verdict is the task's own word, so it cannot
    # make the pipeline skip continueOnFail (which only analyzer rejections do).
    assert report.audit["continueOnFailApplied"] is True, report.document()
    assert report.result == [{"json": {"error": "Security violations detected"}}]
    assert report.audit["stage"] == "run"
    assert report.audit["details"]["verdictSource"] == "child"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("timeout", "Task execution timed out after 10 seconds"),
        ("output_limit_exceeded", "Task printed more than the output limit of 1048576 bytes"),
        ("killed", "Process was forcefully killed (SIGKILL)"),
        ("crashed", "Task process crashed with signal SIGSEGV"),
    ],
)
async def test_a_forged_limit_or_crash_is_reported_as_the_tasks_claim(
    local_pipeline: Factory, kind: str, message: str
) -> None:
    report = await run(local_pipeline, forged(kind, message), stdlib="*", deny=())
    assert report.outcome is Outcome.USER_ERROR, report.document()
    assert report.error is not None
    assert report.error.message == CLAIM_MESSAGE.format(kind=kind)
    assert message in report.error.description
    assert report.audit["details"]["childClaim"] == kind


async def test_a_flood_of_print_entries_on_the_result_pipe_keeps_the_cap(
    local_pipeline: Factory,
) -> None:
    # Issue item 1: 300,000 empty print entries (900 kB, under the 1 MiB cap) in a
    # frame the task wrote.
    code = FLOOD
    report = await run(local_pipeline, code, stdlib="*", deny=())
    assert report.outcome is Outcome.SUCCESS, report.document()
    assert report.prints == [[]] * 100 + [["[Output truncated - 299900 more print statements]"]]
    assert report.audit["details"]["agentPrintsDropped"] == 299_900


async def test_a_print_flood_is_an_output_limit_the_agent_measured(local_pipeline: Factory) -> None:
    code = "while True:\n    print('x' * 10000)"
    report = await run(local_pipeline, code)
    assert report.outcome is Outcome.OUTPUT_LIMIT, report.document()
    assert report.error is not None
    assert report.error.message == "Task printed more than the output limit of 1048576 bytes"
    assert report.audit["details"]["verdictSource"] == "agent:output_cap"
    assert len(report.prints) == 101
