"""The in-child runtime guards (reference 5.7, 6.4, 6.5), from the staged agent package.

Pieces that do not touch process state are tested in this process; everything
after ``harden_process`` (which purges ``sys.modules`` and patches ``importlib``)
runs in a subprocess, as it does in the task child.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import operator
import os
import string
import subprocess
import sys
from collections import UserString
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SPOOF = "'builtin_function_or_method' object has no attribute {!r}"
BYPASS = "because it can be used to bypass security restrictions."
GLOBALS_PATTERN = f"String pattern accessing '__globals__' is disallowed, {BYPASS}"


@pytest.fixture(scope="module")
def guards(agent_pkg: ModuleType) -> Any:
    return agent_pkg.guards


@pytest.fixture(scope="module")
def core(agent_pkg: ModuleType) -> Any:
    return agent_pkg.analyzer_core


def policy(core: Any, stdlib: set[str] | None = None, external: set[str] | None = None) -> Any:
    return core.ImportPolicy(frozenset(stdlib or ()), frozenset(external or ()))


def function_with_globals() -> None:
    """A plain function: its ``__globals__`` is what the format attacks go after."""


def runtime(text: str) -> str:
    """A string the static analyzer cannot see (built at runtime)."""
    return "".join(list(text))


# -- print (5.7) ---------------------------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


CIRCULAR: list[Any] = []
CIRCULAR.append(CIRCULAR)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        pytest.param("hi", "'hi'", id="str-quoted"),
        pytest.param("", "''", id="empty-str"),
        pytest.param('it\'s "x"\n', "'it's \"x\"\n'", id="str-not-escaped"),
        pytest.param("unicode: ü ✓ 🎉", "'unicode: ü ✓ 🎉'", id="str-unicode"),
        pytest.param(None, "None", id="none"),
        pytest.param(42, "42", id="int"),
        pytest.param(3.14, "3.14", id="float"),
        pytest.param(float("nan"), "nan", id="nan"),
        pytest.param(True, "True", id="bool"),
        pytest.param({"a": [1]}, '{"a": [1]}', id="dict-json"),
        pytest.param({"ü": "✓"}, '{"ü": "✓"}', id="dict-unicode"),
        pytest.param([], "[]", id="empty-list"),
        pytest.param({}, "{}", id="empty-dict"),
        pytest.param((1, "a"), '[1, "a"]', id="tuple-as-list"),
        pytest.param(datetime.date(2024, 1, 2), '"2024-01-02"', id="default-str"),
        pytest.param(CIRCULAR, "[Circular list]", id="circular"),
        pytest.param({(1, 2): 3}, "[Circular dict]", id="non-str-keys"),
        pytest.param(Unprintable(), "[Circular Unprintable]", id="failing-str"),
    ],
)
def test_print_argument_formatting(guards: Any, arg: object, expected: str) -> None:
    assert guards.format_print_arg(arg) == expected


def test_one_entry_per_call_and_print_keywords_are_ignored(guards: Any) -> None:
    capture = guards.PrintCapture()
    capture("a", 1, sep="-", end="", flush=True, file=sys.stderr)
    capture()
    assert capture.entries() == [["'a'", "1"], []]
    with pytest.raises(TypeError, match="'color' is an invalid keyword argument for print"):
        capture("x", color="red")


def test_print_truncates_after_max_calls_with_n8n_s_marker(guards: Any) -> None:
    capture = guards.PrintCapture()
    for index in range(250):
        capture(index)
    entries = capture.entries()
    assert len(entries) == 101
    assert entries[99] == ["99"]
    assert entries[100] == ["[Output truncated - 150 more print statements]"]
    small = guards.PrintCapture(max_calls=0)
    small("x")
    assert small.entries() == [["[Output truncated - 1 more print statements]"]]


def test_entries_are_copies(guards: Any) -> None:
    capture = guards.PrintCapture()
    capture("x")
    capture.entries()[0].append("tampered")
    assert capture.entries() == [["'x'"]]


def test_print_overflow_calls_back_then_raises(guards: Any) -> None:
    seen: list[int] = []
    capture = guards.PrintCapture(max_bytes=12, on_overflow=seen.append)
    capture("12345678")  # "'12345678'": 10 bytes
    with pytest.raises(guards.OutputLimitExceeded, match="output limit of 12 bytes"):
        capture("é")  # "'é'": 4 UTF-8 bytes
    assert seen == [14]
    assert capture.entries() == [["'12345678'"]]
    with pytest.raises(guards.OutputLimitExceeded):
        capture("x")  # caught by task code, the next print overflows again
    assert seen == [14, 17]
    assert not issubclass(guards.OutputLimitExceeded, Exception)


def test_print_bytes_of_dropped_calls_count(guards: Any) -> None:
    seen: list[int] = []
    capture = guards.PrintCapture(max_calls=1, max_bytes=12, on_overflow=seen.append)
    for text in ("ab", "cd", "e"):  # 4 + 4 + 3 bytes, two of the calls dropped
        capture(text)
    with pytest.raises(guards.OutputLimitExceeded):
        capture("f")
    assert seen == [14]
    assert capture.entries() == [["'ab'"], ["[Output truncated - 2 more print statements]"]]


def test_print_overflow_is_counted_before_anything_is_kept(guards: Any) -> None:
    capture = guards.PrintCapture(max_bytes=3)
    with pytest.raises(guards.OutputLimitExceeded):
        capture("long")
    assert capture.entries() == []


# -- hardened callables (6.4) --------------------------------------------------------


def hardened(guards: Any, core: Any) -> list[Any]:
    return [
        guards.PrintCapture(),
        guards.SafeFormat(),
        guards.ImportGuard(policy(core), lambda *a, **k: None),
    ]


@pytest.mark.parametrize(
    "attr",
    [
        "__call__",
        "__init__",
        "__new__",
        "__doc__",
        "__dir__",
        "__subclasshook__",
        "__repr__",
        "__class__",
        "__dict__",
        "__globals__",
        "__self__",
        "__reduce_ex__",
        "__getstate__",
        "__slots__",
        "_entries",
        "_on_overflow",
        "_original",
        "_policy",
        "_helpers",
        "nonexistent",
    ],
)
def test_hardened_callables_deny_attribute_reads_with_a_spoofed_error(
    guards: Any, core: Any, attr: str
) -> None:
    for target in hardened(guards, core):
        with pytest.raises(AttributeError) as caught:
            getattr(target, attr)
        assert str(caught.value) == SPOOF.format(attr)
        assert caught.value.obj is None  # AttributeError.obj must not hand the object out


def test_hardened_callables_reject_every_set_and_delete(guards: Any, core: Any) -> None:
    for target in hardened(guards, core):
        with pytest.raises(AttributeError, match="builtin_function_or_method"):
            target._entries = []
        with pytest.raises(AttributeError, match="builtin_function_or_method"):
            del target.anything


def test_hardened_callables_look_like_builtins(guards: Any, core: Any) -> None:
    capture, safe_format, import_guard = hardened(guards, core)
    assert repr(capture) == "<built-in function print>"
    assert str(capture) == "<built-in function print>"
    assert repr(safe_format) == "<built-in function format>"
    assert repr(import_guard) == "<built-in function __import__>"
    assert callable(capture)


def test_attrgetter_paths_to_internals_fail(guards: Any) -> None:
    capture = guards.PrintCapture()
    for path in ("__call__.__globals__", "entries.__func__", "entries.__self__", "__class__"):
        with pytest.raises(AttributeError):
            operator.attrgetter(path)(capture)


def test_exposed_entries_method_is_hardened_too(guards: Any) -> None:
    capture = guards.PrintCapture()
    capture("x")
    method = capture.entries
    assert method() == [["'x'"]]
    assert repr(method) == "<built-in method entries>"
    with pytest.raises(AttributeError, match="builtin_function_or_method"):
        _ = method._owner


# -- the safe-format entry (6.5) -------------------------------------------------------


FORMATTER = string.Formatter()
OK_CALLS = [
    pytest.param(("format", "{}-{k}", 1), {"k": 2}, "1-2", id="str-bound"),
    pytest.param(("format", str, "{}", 3), {}, "3", id="str-unbound"),
    pytest.param(("format_map", "{a}", {"a": 4}), {}, "4", id="format-map"),
    pytest.param(("format", FORMATTER, "{0.real}", 5), {}, "5", id="formatter-bound"),
    pytest.param(("format", string.Formatter, FORMATTER, "{}", 6), {}, "6", id="formatter-unbound"),
    pytest.param(("vformat", FORMATTER, "{x}", (), {"x": 7}), {}, "7", id="vformat"),
    pytest.param(("format", UserString("{}"), 8), {}, "8", id="userstring"),
    pytest.param(("format", UserString, UserString("{}"), 9), {}, "9", id="userstring-unbound"),
    pytest.param(("get_field", FORMATTER, "0.real", (10,), {}), {}, (10, 0), id="get-field-bound"),
]


@pytest.mark.parametrize(("call", "kwargs", "expected"), OK_CALLS)
def test_safe_format_calls_the_real_method(
    guards: Any, call: tuple[Any, ...], kwargs: dict[str, Any], expected: object
) -> None:
    assert guards.SafeFormat()(*call, **kwargs) == expected


def attack_calls() -> list[Any]:
    template = runtime("{0.__globals__}")
    keyed = runtime("{a.__globals__}")
    f = function_with_globals
    nested = UserString("")
    nested.data = UserString(template)  # type: ignore[assignment]
    return [
        pytest.param(("format", template, f), id="str-bound"),
        pytest.param(("format", str, template, f), id="str-unbound"),
        pytest.param(("format_map", keyed, {"a": f}), id="format-map"),
        pytest.param(("format", runtime("{0:{1.__globals__}}"), 1, f), id="nested-spec"),
        pytest.param(("format", FORMATTER, template, f), id="formatter-bound"),
        pytest.param(("format", string.Formatter, FORMATTER, template, f), id="formatter-unbound"),
        pytest.param(("vformat", FORMATTER, template, (f,), {}), id="vformat-bound"),
        pytest.param(("vformat", string.Formatter, FORMATTER, template, (f,), {}), id="vformat-ub"),
        pytest.param(("get_field", FORMATTER, runtime("0.__globals__"), (f,), {}), id="get-field"),
        pytest.param(
            ("get_field", string.Formatter, FORMATTER, runtime("0.__globals__"), (f,), {}),
            id="get-field-unbound",
        ),
        pytest.param(("format", UserString(template), f), id="userstring"),
        pytest.param(("format_map", UserString(keyed), {"a": f}), id="userstring-format-map"),
        pytest.param(("format", UserString, UserString(template), f), id="userstring-unbound"),
        pytest.param(("format", nested, f), id="userstring-nested"),
        pytest.param(("format", FORMATTER, UserString(template), f), id="userstring-as-argument"),
    ]


@pytest.mark.parametrize("call", attack_calls())
def test_safe_format_blocks_runtime_templates(guards: Any, call: tuple[Any, ...]) -> None:
    with pytest.raises(guards.SecurityViolation) as caught:
        guards.SafeFormat()(*call)
    assert caught.value.message == "Security violation detected"
    assert str(caught.value) == "Security violation detected"
    assert caught.value.description == GLOBALS_PATTERN


def test_safe_format_recognises_a_userstring_from_a_fresh_collections(guards: Any) -> None:
    # A module imported after the purge gets its own copy of collections.
    spec = importlib.util.find_spec("collections")
    assert spec is not None
    assert spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.UserString is not UserString
    with pytest.raises(guards.SecurityViolation):
        guards.SafeFormat()("format", fresh.UserString(runtime("{0.__globals__}")), print)


def test_safe_format_refuses_a_userstring_it_cannot_check(guards: Any) -> None:
    odd = UserString("")
    odd.data = FORMATTER  # type: ignore[assignment]
    with pytest.raises(guards.SecurityViolation) as caught:
        guards.SafeFormat()("format", odd, runtime("{0.__globals__}"), print)
    assert "could not be checked" in caught.value.description


def test_safe_format_only_dispatches_format_methods(guards: Any) -> None:
    with pytest.raises(AttributeError, match="builtin_function_or_method"):
        guards.SafeFormat()("__getattribute__", function_with_globals, "__globals__")


# -- the import guard (6.3, 6.4) ---------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append((args, kwargs))
        return "imported"


def test_import_guard_passes_allowed_names_with_unchanged_arguments(guards: Any, core: Any) -> None:
    original = Recorder()
    guard = guards.ImportGuard(policy(core, {"json"}), original)
    scope: dict[str, Any] = {}
    assert guard("json.decoder", scope, None, ("x",), 0) == "imported"
    assert original.calls == [(("json.decoder", scope, None, ("x",), 0), {})]


@pytest.mark.parametrize(
    ("args", "kwargs", "description"),
    [
        pytest.param(
            ("os",),
            {},
            "Import of standard library module 'os' is disallowed. Allowed stdlib modules: json",
            id="absolute",
        ),
        pytest.param(
            (".x", "os"),
            {},
            "Import of standard library module 'os.x' is disallowed. Allowed stdlib modules: json",
            id="import-module-anchor",
        ),
        pytest.param(
            (".x",),
            {"package": "os"},
            "Import of standard library module 'os.x' is disallowed. Allowed stdlib modules: json",
            id="import-module-anchor-keyword",
        ),
        pytest.param(
            (".x",),
            {},
            "Import of external package '.x' is disallowed. Allowed external packages: none",
            id="no-anchor-fails-closed",
        ),
        pytest.param(
            (".x", ""),
            {},
            "Import of external package '.x' is disallowed. Allowed external packages: none",
            id="empty-anchor-fails-closed",
        ),
        pytest.param(
            ("x", {}, None, (), 1),
            {},
            "Import of external package '.x' is disallowed. Allowed external packages: none",
            id="level-without-package-fails-closed",
        ),
        pytest.param(
            ("path", {"__package__": "os"}, None, (), 1),
            {},
            "Import of standard library module 'os.path' is disallowed. Allowed stdlib modules: "
            "json",
            id="level-resolved-against-package",
        ),
        pytest.param(
            ("x", {"__package__": "json"}, None, (), 2),
            {},
            "Import of external package '..x' is disallowed. Allowed external packages: none",
            id="level-beyond-top-fails-closed",
        ),
        pytest.param(
            ("decoder",),
            {"globals": type("Sneaky", (dict,), {})(__package__="json"), "level": 1},
            "Import of external package '.decoder' is disallowed. Allowed external packages: none",
            id="dict-subclass-globals-fail-closed",
        ),
    ],
)
def test_import_guard_refuses(
    guards: Any, core: Any, args: tuple[Any, ...], kwargs: dict[str, Any], description: str
) -> None:
    original = Recorder()
    guard = guards.ImportGuard(policy(core, {"json"}), original)
    with pytest.raises(guards.SecurityViolation) as caught:
        guard(*args, **kwargs)
    assert caught.value.message == "Security violation detected"
    assert caught.value.description == description
    assert original.calls == []


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        pytest.param((".decoder", "json"), {}, id="import-module-anchor"),
        pytest.param(("decoder", {"__package__": "json"}, None, (), 1), {}, id="level-1"),
        pytest.param(
            ("scanner", {"__package__": "json.decoder"}, None, ("x",), 2), {}, id="level-2"
        ),
        pytest.param(("decoder",), {"globals": {"__package__": "json"}, "level": 1}, id="kwargs"),
    ],
)
def test_import_guard_resolves_relative_names(
    guards: Any, core: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    original = Recorder()
    assert guards.ImportGuard(policy(core, {"json"}), original)(*args, **kwargs) == "imported"


def test_import_guard_hands_plain_strings_to_the_original(guards: Any, core: Any) -> None:
    class Sly(str):
        def startswith(self, *args: Any) -> bool:
            return False

    original = Recorder()
    guards.ImportGuard(policy(core, {"json"}), original)(".decoder", Sly("json"))
    (((name, anchor), _),) = original.calls
    assert type(name) is str
    assert type(anchor) is str
    with pytest.raises(TypeError, match="module name must be str, not int"):
        guards.ImportGuard(policy(core), original)(1)


def test_runtime_helpers_pass_only_the_user_guard_and_only_for_their_owners(
    guards: Any, core: Any
) -> None:
    original = Recorder()
    time_only = policy(core, {"time"})
    assert guards.ImportGuard(time_only, original, allow_runtime_helpers=True)("_strptime")
    with pytest.raises(guards.SecurityViolation):
        guards.ImportGuard(time_only, original)("_strptime")
    with pytest.raises(guards.SecurityViolation):
        guards.ImportGuard(policy(core, {"json"}), original, allow_runtime_helpers=True)(
            "_strptime"
        )


def test_import_guards_never_stack(guards: Any, core: Any) -> None:
    original = Recorder()
    inner = guards.ImportGuard(policy(core), original)  # denies everything
    outer = guards.ImportGuard(policy(core, {"json"}), inner)
    assert outer("json") == "imported"  # the inner guard was unwrapped, not called


# -- builtins and globals (6.4) ---------------------------------------------------------


def test_builtins_are_filtered_and_import_is_the_guard(guards: Any, core: Any) -> None:
    guard = guards.ImportGuard(policy(core), Recorder())
    builtins_ = guards.build_builtins(core.DEFAULT_BUILTINS_DENY, guard)
    for name in core.DEFAULT_BUILTINS_DENY:
        assert name not in builtins_
    assert "__loader__" not in builtins_
    assert "__spec__" not in builtins_
    assert builtins_["__import__"] is guard
    assert builtins_["len"] is len
    assert isinstance(builtins_, Mapping)


def test_builtins_mapping_interface(guards: Any, core: Any) -> None:
    builtins_ = guards.build_builtins(["eval"], guards.ImportGuard(policy(core), Recorder()))
    assert builtins_.len is len  # attribute access reads items
    assert builtins_.get("eval") is None
    assert builtins_.get("missing", 1) == 1
    assert "len" in set(builtins_.keys())
    assert len in list(builtins_.values())
    assert ("abs", abs) in builtins_.items()
    assert len(builtins_) == len(list(iter(builtins_)))
    with pytest.raises(KeyError):
        builtins_["eval"]
    with pytest.raises(AttributeError, match="has no attribute 'eval'"):
        _ = builtins_.eval
    with pytest.raises(AttributeError):
        _ = builtins_.__dict__
    assert repr(builtins_).startswith("<read-only builtins:")


@pytest.mark.parametrize(
    "mutation",
    [
        pytest.param(lambda b: b.__setitem__("x", 1), id="setitem"),
        pytest.param(lambda b: b.__delitem__("len"), id="delitem"),
        pytest.param(lambda b: b.update(x=1), id="update"),
        pytest.param(lambda b: b.pop("len"), id="pop"),
        pytest.param(lambda b: b.popitem(), id="popitem"),
        pytest.param(lambda b: b.setdefault("x", 1), id="setdefault"),
        pytest.param(lambda b: b.clear(), id="clear"),
        pytest.param(lambda b: b.__ior__({"x": 1}), id="ior"),
    ],
)
def test_builtins_are_read_only(guards: Any, core: Any, mutation: Any) -> None:
    builtins_ = guards.build_builtins([], guards.ImportGuard(policy(core), Recorder()))
    before = dict(builtins_)
    with pytest.raises((TypeError, AttributeError)):
        mutation(builtins_)
    assert dict(builtins_) == before
    with pytest.raises(AttributeError, match="read-only"):
        builtins_.len = None
    with pytest.raises(AttributeError, match="read-only"):
        del builtins_.len


def test_cpython_accepts_them_as_exec_builtins(guards: Any, core: Any) -> None:
    guard = guards.ImportGuard(policy(core, {"json"}), __import__)
    builtins_ = guards.build_builtins(core.DEFAULT_BUILTINS_DENY, guard)
    scope: dict[str, Any] = {"__builtins__": builtins_}
    exec("import json\nresult = json.dumps(sorted({2, 1}))", scope)
    assert scope["result"] == "[1, 2]"
    with pytest.raises(NameError, match=r"^name 'type' is not defined$"):
        exec("type(1)", {"__builtins__": builtins_})
    with pytest.raises(NameError, match="__build_class__ not found"):
        exec("class A:\n    pass", {"__builtins__": builtins_})
    with pytest.raises(guards.SecurityViolation):
        exec("import os", {"__builtins__": builtins_})


def test_make_globals(guards: Any) -> None:
    first = guards.make_globals(builtins="b", print_fn="p", safe_format="s", _item={"a": 1})
    assert first == {
        "__builtins__": "b",
        "print": "p",
        "__sandbox_safe_format__": "s",
        "_item": {"a": 1},
    }
    assert guards.make_globals(builtins="b", print_fn="p", safe_format="s") is not first
    with pytest.raises(TypeError, match="reserved"):
        guards.make_globals(builtins="b", print_fn="p", safe_format="s", print="x")


def test_security_violation_shape(guards: Any) -> None:
    violation = guards.SecurityViolation("what was refused")
    assert violation.message == "Security violation detected"
    assert violation.description == "what was refused"
    assert issubclass(guards.SecurityViolation, Exception)  # catchable, as in n8n


# -- in a subprocess: hardening and whole executions --------------------------------------

HARNESS = r"""
import json, sys

from sandbox_agent import guards
from sandbox_agent.analyzer_core import ALL_ITEMS_FILENAME, ImportPolicy, wrap_user_code

spec = json.loads(sys.stdin.read())
policy = ImportPolicy(frozenset(spec["stdlib"]), frozenset(spec["external"]))
import_guard = guards.harden_process(policy)
builtins = guards.build_builtins(spec["deny"], import_guard)
capture = guards.PrintCapture()
scope = guards.make_globals(
    builtins=builtins, print_fn=capture, safe_format=guards.SafeFormat(), _items=[], _query=None
)
try:
    exec(wrap_user_code(spec["code"], ALL_ITEMS_FILENAME), scope)
    outcome = {"result": scope["__sandbox_result__"]}
except BaseException as exc:
    outcome = {"error": {
        "type": type(exc).__name__,
        "message": str(exc),
        "description": getattr(exc, "description", None),
    }}
outcome["prints"] = capture.entries()
sys.stdout.write(json.dumps(outcome, default=repr))
"""


def run_harness(agent_path: Path, script: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(agent_path)}
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run(
        [sys.executable, "-c", script],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def execute(
    agent_path: Path,
    code: str,
    *,
    stdlib: tuple[str, ...] = (),
    external: tuple[str, ...] = (),
    deny: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    from runner.analyzer import DEFAULT_BUILTINS_DENY

    spec = {
        "code": code,
        "stdlib": stdlib,
        "external": external,
        "deny": DEFAULT_BUILTINS_DENY if deny is None else deny,
    }
    done = run_harness(agent_path, HARNESS, json.dumps(spec))
    assert done.returncode == 0, done.stderr
    outcome: dict[str, Any] = json.loads(done.stdout)
    return outcome


def violation(description: str) -> dict[str, Any]:
    return {
        "type": "SecurityViolation",
        "message": "Security violation detected",
        "description": description,
    }


STDLIB_OS = "Import of standard library module 'os' is disallowed. Allowed stdlib modules: {}"

EXECUTIONS = [
    pytest.param(
        "return type(1)",
        {},
        {
            "error": {
                "type": "NameError",
                "message": "name 'type' is not defined",
                "description": None,
            }
        },
        id="denied-builtin",
    ),
    pytest.param(
        "import json\nreturn json.loads('[1]')",
        {"stdlib": ("json",)},
        {"result": [1]},
        id="allowed-import",
    ),
    pytest.param(
        "import os",
        {"stdlib": ("json",)},
        {"error": violation(STDLIB_OS.format("json"))},
        id="blocked-import",
    ),
    pytest.param(
        "imp = __import__\nreturn imp(''.join(['o', 's']))",
        {},
        {"error": violation(STDLIB_OS.format("none"))},
        id="runtime-name-blocked",
    ),
    pytest.param(
        "from . import sibling",
        {},
        {
            "error": violation(
                "Import of external package '.' is disallowed. Allowed external packages: none"
            )
        },
        id="relative-import-fails-closed",
    ),
    pytest.param(
        "import importlib\nreturn importlib.import_module('os')",
        {"stdlib": ("importlib",)},
        {"error": violation(STDLIB_OS.format("importlib"))},
        id="import-module-guarded",
    ),
    pytest.param(
        "import importlib\nreturn importlib.__import__('os')",
        {"stdlib": ("importlib",)},
        {"error": violation(STDLIB_OS.format("importlib"))},
        id="importlib-dunder-import-guarded",
    ),
    pytest.param(
        "import importlib\nreturn importlib.import_module('.decoder', 'json').__name__",
        {"stdlib": ("importlib", "json")},
        {"result": "json.decoder"},
        id="import-module-relative-to-allowed-package",
    ),
    pytest.param(
        "return __builtins__['__import__']('os')",
        {},
        {"error": violation(STDLIB_OS.format("none"))},
        id="builtins-dict-import",
    ),
    pytest.param(
        "__builtins__['eval'] = print",
        {},
        {"error": {"type": "TypeError", "message": "builtins are read-only", "description": None}},
        id="builtins-read-only",
    ),
    pytest.param(
        "def f():\n    pass\nreturn ''.join(['{0.__glo', 'bals__}']).format(f)",
        {},
        {"error": violation(GLOBALS_PATTERN)},
        id="format-runtime-template",
    ),
    pytest.param(
        "def f():\n    pass\nt = ''.join(['{a.__glo', 'bals__}'])\nreturn t.format_map({'a': f})",
        {},
        {"error": violation(GLOBALS_PATTERN)},
        id="format-map-runtime-template",
    ),
    pytest.param(
        "import string\ndef f():\n    pass\n"
        "return string.Formatter().format(''.join(['{0.__glo', 'bals__}']), f)",
        {"stdlib": ("string",)},
        {"error": violation(GLOBALS_PATTERN)},
        id="formatter-runtime-template",
    ),
    pytest.param(
        "from collections import UserString\ndef f():\n    pass\n"
        "return UserString(''.join(['{0.__glo', 'bals__}'])).format(f)",
        {"stdlib": ("collections",)},
        {"error": violation(GLOBALS_PATTERN)},
        id="userstring-runtime-template",
    ),
    pytest.param(
        "return '{:>4}|{x}'.format(1, x='y')",
        {},
        {"result": "   1|y"},
        id="ordinary-format-works",
    ),
    pytest.param(
        "from datetime import datetime\nreturn str(datetime.strptime('2024-01-02', '%Y-%m-%d'))",
        {"stdlib": ("datetime",)},
        {"result": "2024-01-02 00:00:00"},
        id="datetime-strptime",
    ),
    pytest.param(
        "import time\nreturn time.strptime('2024-03', '%Y-%m').tm_mon",
        {"stdlib": ("time",)},
        {"result": 3},
        id="time-strptime",
    ),
    pytest.param(
        "import warnings\nwarnings.warn('careful')\nreturn 'warned'",
        {"stdlib": ("warnings",)},
        {"result": "warned"},
        id="warnings-warn",
    ),
    pytest.param(
        "class Point:\n    x = 1\nreturn Point.x",
        {"deny": ("eval",)},
        {"result": 1},
        id="class-when-build-class-allowed",
    ),
    pytest.param(
        "class Point:\n    pass",
        {},
        {
            "error": {
                "type": "NameError",
                "message": "__build_class__ not found",
                "description": None,
            }
        },
        id="class-denied-by-default",
    ),
    pytest.param(
        "print('hi', 1, {'a': [1]}, None)\nprint('Hello, World!', 42, 3.14, True)\n"
        "print('unicode: ü ✓ 🎉', [], {})\nprint()",
        {},
        {
            "result": None,
            "prints": [
                ["'hi'", "1", '{"a": [1]}', "None"],
                ["'Hello, World!'", "42", "3.14", "True"],
                ["'unicode: ü ✓ 🎉'", "[]", "{}"],
                [],
            ],
        },
        id="prints",
    ),
    pytest.param(
        "for i in range(150):\n    print(i)\nreturn len(print.entries())",
        {},
        {"result": 101},
        id="print-truncation-marker",
    ),
    pytest.param(
        "return repr(print), repr(__import__)",
        {},
        {"result": ["<built-in function print>", "<built-in function __import__>"]},
        id="reprs",
    ),
    pytest.param(
        "try:\n    print.__call__\nexcept AttributeError as e:\n    return str(e)",
        {},
        {"result": SPOOF.format("__call__")},
        id="spoofed-attribute-error",
    ),
]


# Allowlisted modules must not hand out what the allowlist refuses (the proxy layer;
# `execute` runs no static analysis, so these reach the runtime guards).
PRIVATE_OF = (
    "Access to private attribute '{}' of module '{}' is disallowed, because it can be "
    "used to bypass security restrictions."
)
STDLIB_DISALLOWED = (
    "Import of standard library module '{}' is disallowed. Allowed stdlib modules: {}"
)
LEGITIMATE = """
import collections.abc
import collections.abc as cabc
import datetime, enum, json, random, re, typing
from collections import abc
from json import decoder
return [
    isinstance({}, collections.abc.Mapping) and cabc.Mapping is abc.Mapping,
    datetime.datetime(2024, 1, 2).isoformat(),
    str(datetime.datetime.strptime("2024-01-02", "%Y-%m-%d").date()),
    decoder.JSONDecodeError is json.JSONDecodeError,
    json.loads("[1]"),
    isinstance(re.match("a", "a"), re.Match),
    random.Random(1).randint(1, 6) == random.Random(1).randint(1, 6),
    repr(typing.List[int]),
    enum.Enum("Color", "RED GREEN").GREEN.value,
    json.__name__,
    repr(random).startswith("<module 'random'"),
    re.enum.Enum is enum.Enum,
]
"""
LEGITIMATE_STDLIB = ("collections", "datetime", "enum", "json", "random", "re", "typing")

EXECUTIONS += [
    pytest.param(
        "import random\nr = random\nreturn r._os.getpid()",
        {"stdlib": ("random",)},
        {"error": violation(PRIVATE_OF.format("_os", "random"))},
        id="proxy-refuses-a-private-name",
    ),
    pytest.param(
        "import uuid\nreturn uuid.os.getpid()",
        {"stdlib": ("uuid",)},
        {"error": violation(STDLIB_DISALLOWED.format("os", "uuid"))},
        id="proxy-refuses-a-public-module-not-allowed",
    ),
    pytest.param(
        "import re\nreturn re.enum.sys.modules['os']",
        {"stdlib": ("enum", "re")},
        {"error": violation(STDLIB_DISALLOWED.format("sys", "enum, re"))},
        id="proxy-refuses-down-a-chain-of-allowed-modules",
    ),
    pytest.param(
        "import enum\nreturn enum.bltns.eval('1')",
        {"stdlib": ("enum",)},
        {"error": violation(STDLIB_DISALLOWED.format("builtins", "enum"))},
        id="proxy-refuses-the-real-builtins",
    ),
    pytest.param(
        "import random\ntry:\n    random.__dict__\nexcept AttributeError as e:\n    return str(e)",
        {"stdlib": ("random",)},
        {"result": "module 'random' has no attribute '__dict__'"},
        id="proxy-hides-the-module-dict",
    ),
    pytest.param(
        "import json\ntry:\n    json.dumps = None\nexcept AttributeError as e:\n    return str(e)",
        {"stdlib": ("json",)},
        {"result": "modules are read-only for task code"},
        id="proxy-is-read-only",
    ),
    pytest.param(
        "import string\nimport random\nreturn string.Formatter().get_field('0._os', (random,), {})",
        {"stdlib": ("random", "string")},
        {"error": violation(PRIVATE_OF.format("_os", "random"))},
        id="proxy-holds-for-a-format-field-too",
    ),
    pytest.param(
        LEGITIMATE,
        {"stdlib": LEGITIMATE_STDLIB},
        {
            "result": [
                True,
                "2024-01-02T00:00:00",
                "2024-01-02",
                True,
                [1],
                True,
                True,
                "typing.List[int]",
                2,
                "json",
                True,
                True,
            ]
        },
        id="proxy-keeps-what-legitimate-code-needs",
    ),
    pytest.param(
        "import random\nreturn random._os.name",
        {"stdlib": ("*",), "external": ("*",)},
        {"result": "posix"},
        id="no-proxy-when-everything-is-allowed",
    ),
]


@pytest.mark.parametrize(("code", "options", "expected"), EXECUTIONS)
def test_execution_after_hardening(
    agent_path: Path, code: str, options: dict[str, Any], expected: dict[str, Any]
) -> None:
    outcome = execute(agent_path, code, **options)
    if "prints" not in expected:
        outcome.pop("prints")
    assert outcome == expected


HARDEN_SCRIPT = r"""
import importlib, json, os, struct, sys, traceback

import re  # loaded before hardening, like the agent's own imports
from sandbox_agent import guards
from sandbox_agent.analyzer_core import ImportPolicy

stdlib, external = json.loads(sys.argv[1])
policy = ImportPolicy(frozenset(stdlib), frozenset(external))
first = guards.harden_process(policy)
second = guards.harden_process(policy)  # installing twice must not stack guards
report = {
    "modules": sorted(sys.modules),
    "import_module": repr(importlib.import_module),
    "unwrapped_is_original": (
        guards._unwrap_import(importlib.import_module) is guards._REAL_IMPORT_MODULE
        and guards._unwrap_import(importlib.__import__) is guards._REAL_IMPORTLIB_IMPORT
    ),
    "user_guard": repr(second),
}
try:
    importlib.import_module("os")
    report["import_module_os"] = "imported"
except guards.SecurityViolation as exc:
    report["import_module_os"] = exc.description
# What the caller imported before hardening still works.
report["caller"] = [
    json.dumps({"a": 1}),
    os.getpid() > 0,
    struct.pack(">I", 1).hex(),
    re.sub("a", "b", "aa"),
    "".join(traceback.format_exception_only(ValueError("x"))).strip(),
]
print(json.dumps(report))
"""


def harden(agent_path: Path, stdlib: list[str], external: list[str]) -> dict[str, Any]:
    script = HARDEN_SCRIPT
    env = {**os.environ, "PYTHONPATH": str(agent_path)}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps([stdlib, external])],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_harden_process_purges_modules_and_guards_importlib(agent_path: Path) -> None:
    report = harden(agent_path, ["json"], [])
    modules = set(report["modules"])
    for kept in ("builtins", "__main__", "sys", "traceback", "linecache", "importlib"):
        assert kept in modules
    assert {"importlib.machinery", "importlib.util", "json", "json.decoder"} <= modules
    for purged in ("os", "re", "struct", "enum", "sandbox_agent", "sandbox_agent.guards"):
        assert purged not in modules
    assert report["import_module"] == "<built-in function __import__>"
    assert report["user_guard"] == "<built-in function __import__>"
    assert report["unwrapped_is_original"] is True
    assert report["import_module_os"] == (
        "Import of standard library module 'os' is disallowed. Allowed stdlib modules: json"
    )
    assert report["caller"] == ['{"a": 1}', True, "00000001", "bb", "ValueError: x"]


def test_harden_process_wildcards_keep_a_whole_kind(agent_path: Path) -> None:
    stdlib_all = set(harden(agent_path, ["*"], [])["modules"])
    assert {"os", "re", "struct", "enum"} <= stdlib_all
    assert "sandbox_agent" not in stdlib_all
    external_all = harden(agent_path, [], ["*"])
    assert {"sandbox_agent", "sandbox_agent.guards"} <= set(external_all["modules"])
    assert "os" not in external_all["modules"]
    assert external_all["import_module_os"].startswith(
        "Import of standard library module 'os' is disallowed"
    )


# -- third-party packages after hardening (issue 14) -------------------------------------

LIBRARY_SCRIPT = r"""
import importlib, json, sys

import collections.abc  # loaded before hardening and kept: collections is allowed
from sandbox_agent import guards
from sandbox_agent.analyzer_core import ImportPolicy

guards.harden_process(ImportPolicy(frozenset({"collections"}), frozenset()))
report = {}
# A package probing for an optional dependency, as pandas does for pytz.
try:
    importlib.import_module("pytz")
    report["optional"] = "imported"
except ImportError as exc:
    report["optional"] = [
        type(exc).__name__, isinstance(exc, guards.SecurityViolation), exc.description
    ]
# A package deriving from a kept ABC and from abc.ABC, imported after the purge.
import abc
class Both(collections.abc.Iterator, abc.ABC):
    def __next__(self):
        raise StopIteration
report["abc"] = [abc.ABCMeta is type(collections.abc.Iterator), type(Both).__name__]
print(json.dumps(report))
"""


def test_importlib_refuses_library_code_as_a_missing_module(agent_path: Path) -> None:
    done = run_harness(agent_path, LIBRARY_SCRIPT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # Refused all the same, and a security violation; to the library, an ImportError.
    assert report["optional"] == [
        "ImportRefused",
        True,
        "Import of external package 'pytz' is disallowed. Allowed external packages: none",
    ]
    # abc stays loaded: a second ABCMeta made `class X(Iterator, ABC)` a metaclass
    # conflict (pandas' SASReader) before it did.
    assert report["abc"] == [True, "ABCMeta"]


@pytest.mark.parametrize(
    ("code", "stdlib"),
    [
        pytest.param(
            "try:\n    import os\nexcept ImportError:\n    return 'swallowed'", (), id="import"
        ),
        pytest.param(
            "import importlib\ntry:\n    importlib.import_module('os')\n"
            "except ImportError:\n    return 'swallowed'",
            ("importlib",),
            id="importlib",
        ),
    ],
)
def test_task_code_cannot_take_a_refusal_for_a_missing_module(
    agent_path: Path, code: str, stdlib: tuple[str, ...]
) -> None:
    outcome = execute(agent_path, code, stdlib=stdlib)
    outcome.pop("prints")
    allowed = ", ".join(stdlib) or "none"
    assert outcome == {
        "error": violation(
            f"Import of standard library module 'os' is disallowed. Allowed stdlib modules: "
            f"{allowed}"
        )
    }


def test_harden_process_keeps_abc(agent_path: Path) -> None:
    assert "abc" in harden(agent_path, ["json"], [])["modules"]
