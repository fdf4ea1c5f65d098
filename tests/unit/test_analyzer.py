"""The static analyzer: every check of reference 6.2/6.3, with n8n's exact texts.

Expected violations are written out in full (``Line N: <reason>``), in the order
n8n reports them, because users and n8n's node compare them verbatim.
"""

from __future__ import annotations

import ast
import copy
import linecache
import pickle
import traceback
from typing import Any

import pytest

from runner.analyzer import (
    ALL_ITEMS_FILENAME,
    BLOCKED_ATTRIBUTES,
    BLOCKED_NAMES,
    DEFAULT_BUILTINS_DENY,
    FORMAT_METHODS,
    PER_ITEM_FILENAME,
    RESULT_NAME,
    SAFE_FORMAT_NAME,
    SECURITY_VIOLATION_MESSAGE,
    SECURITY_VIOLATIONS_MESSAGE,
    FormatCallRewriter,
    ImportPolicy,
    Violation,
    analyze,
    blocked_token,
    format_template_tokens,
    import_error,
    parse_allowlist,
    scan_string,
    string_pattern_message,
    wrap_user_code,
)

NONE = ImportPolicy()
JSON = ImportPolicy(stdlib_allow=frozenset({"json"}))
ALL = ImportPolicy(frozenset({"*"}), frozenset({"*"}))

BYPASS = "because it can be used to bypass security restrictions."


def name_msg(line: int, name: str) -> str:
    return f"Line {line}: Access to name '{name}' is disallowed, {BYPASS}"


def attr_msg(line: int, attr: str) -> str:
    return f"Line {line}: Access to attribute '{attr}' is disallowed, {BYPASS}"


def pattern_msg(line: int, attr: str) -> str:
    return f"Line {line}: String pattern accessing '{attr}' is disallowed, {BYPASS}"


def stdlib_msg(line: int, module: str, allowed: str = "none") -> str:
    return (
        f"Line {line}: Import of standard library module '{module}' is disallowed. "
        f"Allowed stdlib modules: {allowed}"
    )


def external_msg(line: int, module: str, allowed: str = "none") -> str:
    return (
        f"Line {line}: Import of external package '{module}' is disallowed. "
        f"Allowed external packages: {allowed}"
    )


def bare_msg(line: int, attr: str) -> str:
    return (
        f"Line {line}: Extracting '{attr}' as a bound method is disallowed; call it directly "
        "on its receiver instead."
    )


RELATIVE = "Relative imports are disallowed."
MANGLED = (
    "Access to name-mangled attributes (pattern: _ClassName__attr) is disallowed for "
    "security reasons."
)
DYNAMIC = "Dynamic __import__() calls are not allowed for security reasons."
POSITIONAL = "Positional match patterns are disallowed for security reasons."


def messages(code: str, policy: ImportPolicy = NONE) -> list[str]:
    return [str(violation) for violation in analyze(code, policy)]


# -- the constants are n8n's ---------------------------------------------------------


def test_blocked_attributes_are_n8n_2_27_4s_set() -> None:
    assert set(BLOCKED_ATTRIBUTES) == {
        "__subclasses__",
        "__globals__",
        "__builtins__",
        "__traceback__",
        "tb_frame",
        "tb_next",
        "f_back",
        "f_globals",
        "f_locals",
        "f_code",
        "f_builtins",
        "__getattribute__",
        "__qualname__",
        "__module__",
        "gi_frame",
        "gi_code",
        "gi_yieldfrom",
        "cr_frame",
        "cr_code",
        "ag_frame",
        "ag_code",
        "obj",
        "__thisclass__",
        "__self_class__",
        "__objclass__",
        "__reduce__",
        "__reduce_ex__",
        "__prepare__",
        "__instancecheck__",
        "__subclasscheck__",
        "__match_args__",
        "__base__",
        "__class__",
        "__bases__",
        "__code__",
        "__closure__",
        "__loader__",
        "__cached__",
        "__dict__",
        "__import__",
        "__mro__",
        "__init_subclass__",
        "__getattr__",
        "__setattr__",
        "__delattr__",
        "__self__",
        "__func__",
        "__wrapped__",
        "__annotations__",
        "__spec__",
    }
    assert len(BLOCKED_ATTRIBUTES) == 50


def test_blocked_names_are_n8n_s_plus_our_globals() -> None:
    assert set(BLOCKED_NAMES) == {
        "__loader__",
        "__builtins__",
        "__globals__",
        "__spec__",
        "__name__",
        "__n8n_internal_safe_format__",
        SAFE_FORMAT_NAME,
        RESULT_NAME,
    }
    assert SAFE_FORMAT_NAME == "__sandbox_safe_format__"
    assert RESULT_NAME == "__sandbox_result__"


def test_default_builtins_deny_is_n8n_s_list_in_order() -> None:
    assert ",".join(DEFAULT_BUILTINS_DENY) == (
        "eval,exec,compile,open,input,breakpoint,getattr,object,type,vars,setattr,delattr,"
        "hasattr,dir,memoryview,__build_class__,globals,locals,license,help,credits,copyright"
    )


def test_other_constants() -> None:
    assert set(FORMAT_METHODS) == {"format", "format_map", "vformat", "get_field"}
    assert ALL_ITEMS_FILENAME == "<all_items_task_execution>"
    assert PER_ITEM_FILENAME == "<per_item_task_execution>"
    assert SECURITY_VIOLATIONS_MESSAGE == "Security violations detected"
    assert SECURITY_VIOLATION_MESSAGE == "Security violation detected"


def test_violation_str_is_n8n_s_line_format() -> None:
    assert str(Violation(3, "Relative imports are disallowed.")) == (
        "Line 3: Relative imports are disallowed."
    )


# -- allowlists (6.3) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("", set(), id="empty-allows-nothing"),
        pytest.param(" json , re ,", {"json", "re"}, id="trimmed-empties-dropped"),
        pytest.param("*", {"*"}, id="wildcard"),
        pytest.param(" * ,", {"*"}, id="wildcard-trimmed"),
        pytest.param("json,json", {"json"}, id="duplicates"),
    ],
)
def test_parse_allowlist(raw: str, expected: set[str]) -> None:
    assert parse_allowlist(raw, "N8N_RUNNERS_STDLIB_ALLOW") == expected


def test_wildcard_must_be_alone_with_n8n_s_text() -> None:
    with pytest.raises(ValueError, match="must be used alone") as caught:
        parse_allowlist("re, *, json", "N8N_RUNNERS_EXTERNAL_ALLOW")
    assert str(caught.value) == (
        "Wildcard '*' in N8N_RUNNERS_EXTERNAL_ALLOW must be used alone, not with other "
        "modules. Got: *, json, re"
    )


def test_policy_from_env_strings_names_the_variable() -> None:
    assert ImportPolicy.from_env_strings("json, re", "") == ImportPolicy(
        frozenset({"json", "re"}), frozenset()
    )
    with pytest.raises(ValueError, match="N8N_RUNNERS_STDLIB_ALLOW"):
        ImportPolicy.from_env_strings("*,os", "")
    with pytest.raises(ValueError, match="N8N_RUNNERS_EXTERNAL_ALLOW"):
        ImportPolicy.from_env_strings("", "*,numpy")


def test_policy_allows_everything_only_when_both_are_wildcards() -> None:
    assert ALL.allows_everything
    assert not ImportPolicy(frozenset({"*"}), frozenset()).allows_everything
    assert not ImportPolicy(frozenset(), frozenset({"*"})).allows_everything


def test_policy_cache_key_is_sorted_and_hashable() -> None:
    policy = ImportPolicy(frozenset({"re", "json"}), frozenset({"numpy"}))
    assert policy.cache_key() == (("json", "re"), ("numpy",))
    assert hash(policy.cache_key()) == hash(
        ImportPolicy.from_env_strings("re,json", "numpy").cache_key()
    )


@pytest.mark.parametrize(
    ("record", "same", "other", "text"),
    [
        pytest.param(
            JSON,
            ImportPolicy(frozenset({"json"}), frozenset()),
            ImportPolicy(frozenset(), frozenset({"json"})),
            "ImportPolicy(stdlib_allow=frozenset({'json'}), external_allow=frozenset())",
            id="policy",
        ),
        pytest.param(
            Violation(3, "x"),
            Violation(3, "x"),
            Violation(4, "x"),
            "Violation(line=3, message='x')",
            id="violation",
        ),
    ],
)
def test_policy_and_violation_are_frozen_records(
    record: Any, same: Any, other: Any, text: str
) -> None:
    # What @dataclass(frozen=True, slots=True) gave them (they are cache keys, sent to
    # and rebuilt from the analysis workers): value equality and hash, the dataclass
    # repr, pickling, pattern matching by position, no assignment and no __dict__.
    assert record == same
    assert hash(record) == hash(same)
    assert record != other
    assert record != tuple(getattr(record, name) for name in record.__match_args__)
    assert repr(record) == text
    assert pickle.loads(pickle.dumps(record)) == record
    assert copy.deepcopy(record) == record
    match record:
        case ImportPolicy(stdlib, external):
            assert (stdlib, external) == (record.stdlib_allow, record.external_allow)
        case Violation(line, message):
            assert (line, message) == (record.line, record.message)
    name = record.__match_args__[0]
    with pytest.raises(AttributeError, match=f"cannot assign to field '{name}'"):
        setattr(record, name, None)
    with pytest.raises(AttributeError, match=f"cannot delete field '{name}'"):
        delattr(record, name)
    # (The dataclass refused other names with a TypeError, from its generated super().)
    with pytest.raises((AttributeError, TypeError)):
        record.extra = 1
    assert not hasattr(record, "__dict__")


@pytest.mark.parametrize(
    ("module", "policy", "expected"),
    [
        pytest.param("json", JSON, None, id="stdlib-allowed"),
        pytest.param("json.decoder", JSON, None, id="submodule-of-allowed"),
        pytest.param(
            "os.path",
            JSON,
            "Import of standard library module 'os.path' is disallowed. Allowed stdlib "
            "modules: json",
            id="full-dotted-path-in-text",
        ),
        pytest.param(
            "numpy",
            JSON,
            "Import of external package 'numpy' is disallowed. Allowed external packages: none",
            id="external-none",
        ),
        pytest.param(
            "numpy",
            ImportPolicy(frozenset(), frozenset({"pandas", "attrs"})),
            "Import of external package 'numpy' is disallowed. Allowed external packages: "
            "attrs, pandas",
            id="external-list-sorted",
        ),
        pytest.param("anything", ImportPolicy(frozenset(), frozenset({"*"})), None, id="ext-wild"),
        pytest.param("subprocess", ImportPolicy(frozenset({"*"})), None, id="stdlib-wildcard"),
        pytest.param(
            "os",
            ImportPolicy(frozenset(), frozenset({"*"})),
            "Import of standard library module 'os' is disallowed. Allowed stdlib modules: none",
            id="external-wildcard-is-not-stdlib",
        ),
        pytest.param(
            "dateutil.relativedelta",
            ImportPolicy(frozenset(), frozenset({"dateutil.relativedelta"})),
            "Import of external package 'dateutil.relativedelta' is disallowed. Allowed external "
            "packages: dateutil.relativedelta",
            id="dotted-entry-allows-nothing",
        ),
    ],
)
def test_import_error(module: str, policy: ImportPolicy, expected: str | None) -> None:
    assert import_error(module, policy) == expected


# -- every check, with its exact text -------------------------------------------------


CASES: list[Any] = [
    # imports
    pytest.param(
        "import os\nx = ().__class__",
        NONE,
        [stdlib_msg(1, "os"), attr_msg(2, "__class__")],
        id="capture-example-from-reference-5.5",
    ),
    pytest.param("import os", JSON, [stdlib_msg(1, "os", "json")], id="import-lists-allowed"),
    pytest.param("import os.path", NONE, [stdlib_msg(1, "os.path")], id="import-dotted"),
    pytest.param("import numpy as np", NONE, [external_msg(1, "numpy")], id="import-external"),
    pytest.param(
        "import numpy", ImportPolicy(external_allow=frozenset({"numpy"})), [], id="external-allowed"
    ),
    pytest.param("from os import path", NONE, [stdlib_msg(1, "os")], id="from-import"),
    pytest.param(
        "import os\nimport os.path\nfrom os import sep\n__import__('os')",
        NONE,
        [stdlib_msg(1, "os")],
        id="each-top-level-reported-once",
    ),
    pytest.param(
        "import json\nimport os", JSON, [stdlib_msg(2, "os", "json")], id="allowed-then-denied"
    ),
    pytest.param(
        "import os.path\nfrom os import sep", ImportPolicy(frozenset({"os"})), [], id="top-level"
    ),
    pytest.param("from json import *", JSON, [], id="star-import-of-allowed"),
    pytest.param("from . import x", NONE, [f"Line 1: {RELATIVE}"], id="relative-dot"),
    pytest.param("from .mod import y", NONE, [f"Line 1: {RELATIVE}"], id="relative-module"),
    pytest.param("from .. import z", NONE, [f"Line 1: {RELATIVE}"], id="relative-parent"),
    pytest.param(
        "__import__('.x')\n__import__('.x')",
        NONE,
        [f"Line 1: {RELATIVE}", f"Line 2: {RELATIVE}"],
        id="relative-dynamic-every-time",
    ),
    pytest.param(
        "import json as __builtins__", JSON, [name_msg(1, "__builtins__")], id="import-alias-name"
    ),
    pytest.param(
        "from json import loads as __spec__", JSON, [name_msg(1, "__spec__")], id="from-alias-name"
    ),
    pytest.param(
        "from json import __loader__", JSON, [name_msg(1, "__loader__")], id="from-imported-name"
    ),
    pytest.param(
        "from json import __builtins__ as b",
        JSON,
        [name_msg(1, "__builtins__")],
        id="from-imported-name-behind-harmless-alias",
    ),
    pytest.param(
        "from json import __dict__", JSON, [attr_msg(1, "__dict__")], id="from-imported-attribute"
    ),
    pytest.param("import json as __class__", JSON, [attr_msg(1, "__class__")], id="alias-attr"),
    # names
    pytest.param("__builtins__", NONE, [name_msg(1, "__builtins__")], id="name-load"),
    pytest.param("x = __name__", NONE, [name_msg(1, "__name__")], id="name-dunder-name"),
    pytest.param("__spec__ = 1", NONE, [name_msg(1, "__spec__")], id="name-store"),
    pytest.param("del __loader__", NONE, [name_msg(1, "__loader__")], id="name-del"),
    pytest.param("x = __globals__", NONE, [name_msg(1, "__globals__")], id="name-globals"),
    pytest.param(
        "__n8n_internal_safe_format__('format', '{}', 1)",
        NONE,
        [name_msg(1, "__n8n_internal_safe_format__")],
        id="n8n-safe-format-global",
    ),
    pytest.param(
        "f = __sandbox_safe_format__",
        NONE,
        [name_msg(1, "__sandbox_safe_format__")],
        id="our-safe-format-global",
    ),
    pytest.param(
        "__sandbox_result__ = 1", NONE, [name_msg(1, "__sandbox_result__")], id="result-global"
    ),
    pytest.param("(__builtins__ := {})", NONE, [name_msg(1, "__builtins__")], id="walrus-store"),
    # attributes
    pytest.param("x = y._Foo__bar", NONE, [f"Line 1: {MANGLED}"], id="name-mangled"),
    pytest.param("x = y._a__", NONE, [f"Line 1: {MANGLED}"], id="name-mangled-empty-tail"),
    pytest.param(
        "x = ().__class__.__bases__[0].__subclasses__()",
        NONE,
        [attr_msg(1, "__subclasses__"), attr_msg(1, "__bases__"), attr_msg(1, "__class__")],
        id="classic-chain-outermost-first",
    ),
    pytest.param("f = '{}'.format", NONE, [bare_msg(1, "format")], id="bare-format"),
    pytest.param("f = d.format_map", NONE, [bare_msg(1, "format_map")], id="bare-format-map"),
    pytest.param("f = fmt.vformat", NONE, [bare_msg(1, "vformat")], id="bare-vformat"),
    pytest.param("f = fmt.get_field", NONE, [bare_msg(1, "get_field")], id="bare-get-field"),
    pytest.param(
        "x = list(map(str.format, ['{}'], [1]))", NONE, [bare_msg(1, "format")], id="bare-in-map"
    ),
    pytest.param("x = (str.format)('{}', 1)", NONE, [], id="parenthesized-call-is-a-call"),
    # dynamic imports
    pytest.param("__import__(name)", NONE, [f"Line 1: {DYNAMIC}"], id="dynamic-import"),
    pytest.param("__import__()", NONE, [f"Line 1: {DYNAMIC}"], id="dynamic-import-no-args"),
    pytest.param("__import__(b'os')", NONE, [f"Line 1: {DYNAMIC}"], id="dynamic-import-bytes"),
    pytest.param("m = __import__('json')", JSON, [], id="literal-import-allowed"),
    pytest.param("m = __import__('os')", NONE, [stdlib_msg(1, "os")], id="literal-import-denied"),
    pytest.param(
        "builtins.__import__('os')",
        NONE,
        [stdlib_msg(1, "os"), attr_msg(1, "__import__")],
        id="builtins-dot-import",
    ),
    pytest.param(
        "__builtins__.__import__(x)",
        NONE,
        [f"Line 1: {DYNAMIC}", attr_msg(1, "__import__"), name_msg(1, "__builtins__")],
        id="dunder-builtins-dot-import",
    ),
    # subscripts on the builtins
    pytest.param(
        "__builtins__['__import__']('os')",
        NONE,
        [attr_msg(1, "__import__"), name_msg(1, "__builtins__"), attr_msg(1, "__import__")],
        id="builtins-dict-import",
    ),
    pytest.param(
        "x = builtins['__dict__']",
        NONE,
        [attr_msg(1, "__dict__"), attr_msg(1, "__dict__")],
        id="builtins-subscript",
    ),
    pytest.param(
        "x = sys.__builtins__['__spec__']",
        NONE,
        [attr_msg(1, "__spec__"), attr_msg(1, "__builtins__"), name_msg(1, "__spec__")],
        id="attribute-builtins-subscript",
    ),
    pytest.param(
        "x = m.builtins['__loader__']",
        NONE,
        [attr_msg(1, "__loader__"), name_msg(1, "__loader__")],
        id="attribute-named-builtins-subscript",
    ),
    pytest.param("x = builtins['len']", NONE, [], id="builtins-subscript-harmless-key"),
    # string literals
    pytest.param("x = '__class__'", NONE, [attr_msg(1, "__class__")], id="literal-attribute"),
    pytest.param("x = '__name__'", NONE, [name_msg(1, "__name__")], id="literal-name"),
    pytest.param("x = 'obj'", NONE, [attr_msg(1, "obj")], id="literal-obj"),
    pytest.param("x = '{0.__class__}'", NONE, [pattern_msg(1, "__class__")], id="template-attr"),
    pytest.param(
        "x = '{0[__globals__]}'", NONE, [pattern_msg(1, "__globals__")], id="template-key"
    ),
    pytest.param(
        "x = \"{0['__builtins__']}\"", NONE, [pattern_msg(1, "__builtins__")], id="template-quoted"
    ),
    pytest.param(
        "x = '{0:{1.__mro__}}'", NONE, [pattern_msg(1, "__mro__")], id="template-nested-spec"
    ),
    pytest.param(
        "x = '{0.__class__.__base__} {1[__name__]}'",
        NONE,
        [pattern_msg(1, "__class__"), pattern_msg(1, "__base__"), pattern_msg(1, "__name__")],
        id="template-every-token",
    ),
    pytest.param(
        "x = '{.__init__.__globals__[__builtins__]}'",
        NONE,
        [pattern_msg(1, "__globals__"), pattern_msg(1, "__builtins__")],
        id="template-auto-numbered",
    ),
    pytest.param("x = '{0.__class__'", NONE, [], id="unparsable-template-ignored"),
    pytest.param("x = b'__class__'", NONE, [], id="bytes-not-checked"),
    pytest.param(
        "x = f'__class__{y}'", NONE, [attr_msg(1, "__class__")], id="fstring-literal-part"
    ),
    pytest.param(
        "x = f'{{0.__class__}}'", NONE, [pattern_msg(1, "__class__")], id="fstring-escaped-braces"
    ),
    pytest.param("x = f'{y.__class__}'", NONE, [attr_msg(1, "__class__")], id="fstring-expr"),
    pytest.param(
        "x = '''\n{0.__globals__}'''", NONE, [pattern_msg(1, "__globals__")], id="multiline-string"
    ),
    # concatenation
    pytest.param("x = '__cla' + 'ss__'", NONE, [attr_msg(1, "__class__")], id="concat"),
    pytest.param(
        "x = '{0.__glo' + 'bals__}'", NONE, [pattern_msg(1, "__globals__")], id="concat-template"
    ),
    pytest.param(
        "x = '__glo' + 'bals__' + ''",
        NONE,
        [name_msg(1, "__globals__"), name_msg(1, "__globals__")],
        id="concat-every-subtree",
    ),
    pytest.param("x = y + '__cla' + 'ss__'", NONE, [], id="concat-with-a-name-is-not-folded"),
    pytest.param("x = ''.join(['__cla', 'ss__'])", NONE, [], id="join-is-not-seen"),
    # global and bindings
    pytest.param(
        "global __builtins__",
        NONE,
        [f"Line 1: Global declaration of '__builtins__' is disallowed, {BYPASS}"],
        id="global",
    ),
    pytest.param("global x\nx = 1", NONE, [], id="global-harmless"),
    pytest.param(
        "def __builtins__():\n    pass",
        NONE,
        [f"Line 1: Function named '__builtins__' is disallowed, {BYPASS}"],
        id="def",
    ),
    pytest.param(
        "async def __spec__():\n    pass",
        NONE,
        [f"Line 1: Function named '__spec__' is disallowed, {BYPASS}"],
        id="async-def",
    ),
    pytest.param(
        "class __loader__:\n    pass",
        NONE,
        [f"Line 1: Class named '__loader__' is disallowed, {BYPASS}"],
        id="class",
    ),
    pytest.param(
        "f = lambda __builtins__: 0",
        NONE,
        [f"Line 1: Parameter named '__builtins__' is disallowed, {BYPASS}"],
        id="lambda-parameter",
    ),
    pytest.param(
        "def f(__name__, /, __spec__, *__loader__, __globals__, **__builtins__):\n    pass",
        NONE,
        [
            f"Line 1: Parameter named '{name}' is disallowed, {BYPASS}"
            for name in ("__name__", "__spec__", "__loader__", "__globals__", "__builtins__")
        ],
        id="every-parameter-kind",
    ),
    pytest.param(
        "try:\n    pass\nexcept Exception as __builtins__:\n    pass",
        NONE,
        [name_msg(3, "__builtins__")],
        id="except-as",
    ),
    # match
    pytest.param(
        "match p:\n    case Point(x, y):\n        pass",
        NONE,
        [f"Line 2: {POSITIONAL}"],
        id="match-positional",
    ),
    pytest.param(
        "match e:\n    case AttributeError(obj=o):\n        pass",
        NONE,
        [f"Line 2: Match pattern extracting attribute 'obj' is disallowed, {BYPASS}"],
        id="match-keyword-obj",
    ),
    pytest.param(
        "match e:\n    case C(1, __self__=s):\n        pass",
        NONE,
        [
            f"Line 2: {POSITIONAL}",
            f"Line 2: Match pattern extracting attribute '__self__' is disallowed, {BYPASS}",
        ],
        id="match-both",
    ),
    pytest.param(
        "match p:\n    case Point(x=0, y=y):\n        pass\n    case [a, b]:\n        pass",
        NONE,
        [],
        id="match-keywords-and-sequences-are-fine",
    ),
]


@pytest.mark.parametrize(("code", "policy", "expected"), CASES)
def test_check(code: str, policy: ImportPolicy, expected: list[str]) -> None:
    assert messages(code, policy) == expected


@pytest.mark.parametrize("attr", sorted(BLOCKED_ATTRIBUTES))
def test_every_blocked_attribute(attr: str) -> None:
    assert messages(f"value = thing.{attr}") == [attr_msg(1, attr)]


@pytest.mark.parametrize("name", sorted(BLOCKED_NAMES))
def test_every_blocked_name(name: str) -> None:
    assert messages(f"value = {name}") == [name_msg(1, name)]


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("x = 'object'", id="word-object"),
        pytest.param("x = 'module'", id="word-module"),
        pytest.param("x = 'type'", id="word-type"),
        pytest.param("x = 'use __init__ to set up'", id="dunder-in-prose"),
        pytest.param("x = f'{y} and {z!r:>10}'", id="ordinary-fstring"),
        pytest.param("x = '{}'.format(1)", id="format-call"),
        pytest.param("x = '{name}'.format(name=1)", id="format-keyword"),
        pytest.param("x = '{0.real}'.format(1)", id="format-harmless-attr"),
        pytest.param("x = '{0[key]}'.format({'key': 1})", id="format-harmless-key"),
        pytest.param("x = '{:>10}'.format('x')", id="format-spec"),
        pytest.param("x = '{a}'.format_map({'a': 1})", id="format-map-call"),
        pytest.param("x = y._private", id="single-underscore"),
        pytest.param("x = y.__len__()", id="ordinary-dunder"),
        pytest.param("x = y.__x", id="double-underscore-no-class-part"),
        pytest.param("x = _items[0]['json']", id="items"),
        pytest.param("return [{'json': item} for item in _items]", id="top-level-return"),
        pytest.param("x = 1\nreturn x", id="return-after-statements"),
        pytest.param("import json\nreturn json.dumps({})", id="allowed-import-used"),
    ],
)
def test_no_false_positives(code: str) -> None:
    assert messages(code, JSON) == []


# -- private attributes of imported names (ours: n8n 2.27.4 lets random._os through) ---

STDLIB = ImportPolicy(
    frozenset({"random", "json", "collections", "datetime", "re", "typing", "enum", "uuid"})
)
PRIVATE = "Access to private attribute '{}' of imported name '{}' is disallowed, " + BYPASS


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        pytest.param(
            "import random\nreturn random._os.getpid()",
            [f"Line 2: {PRIVATE.format('_os', 'random')}"],
            id="random-_os",
        ),
        pytest.param(
            "import random as r\nx = r._inst",
            [f"Line 2: {PRIVATE.format('_inst', 'r')}"],
            id="alias",
        ),
        pytest.param(
            "import json.decoder\nx = json.decoder._json",
            [f"Line 2: {PRIVATE.format('_json', 'json')}"],
            id="down-a-dotted-chain",
        ),
        pytest.param(
            "from json import decoder\nx = decoder.c_scanstring._x",
            [f"Line 2: {PRIVATE.format('_x', 'decoder')}"],
            id="from-import-binding",
        ),
        pytest.param(
            "from random import _os",
            ["Line 1: Import of private name '_os' from 'random' is disallowed, " + BYPASS],
            id="from-import-private",
        ),
        pytest.param(
            "def f():\n    import random\n    return random._os\nreturn f()",
            [f"Line 3: {PRIVATE.format('_os', 'random')}"],
            id="inside-a-function",
        ),
        pytest.param(
            "import random\nx = random._Random__x",
            [
                "Line 2: Access to name-mangled attributes (pattern: _ClassName__attr) is "
                "disallowed for security reasons."
            ],
            id="mangled-reported-once",
        ),
    ],
)
def test_private_attributes_of_imported_names(code: str, expected: list[str]) -> None:
    assert messages(code, STDLIB) == expected


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import datetime\nreturn datetime.datetime.now().year", id="datetime"),
        pytest.param("import collections.abc\nx = collections.abc.Mapping", id="abc"),
        pytest.param("from collections import abc\nx = abc.Mapping", id="from-abc"),
        pytest.param("import json\nx = json.decoder.JSONDecodeError", id="json-decoder"),
        pytest.param("import re\nx = re.Match", id="re-match"),
        pytest.param("import random\nx = random.Random(1)", id="random-random"),
        pytest.param("import random\nx = random.Random(1)._randbelow(5)", id="on-a-call"),
        pytest.param("import typing\nx = typing.List[int]", id="typing"),
        pytest.param("import enum\nx = enum.Enum", id="enum"),
        pytest.param("import random\nx = random.__name__", id="dunder-name"),
        pytest.param("x = y._private", id="not-imported"),
        pytest.param("import json\nx = _items[0]._private", id="other-root"),
    ],
)
def test_public_attributes_of_imported_names_are_fine(code: str) -> None:
    assert messages(code, STDLIB) == []


# -- the n8n proof of concept (references 10.1 and 11) ---------------------------------

POC = """global __builtins__

def shadow(_):
    return {"__import__": print}

@shadow
def __builtins__():
    pass

class Forge(type):
    def __instancecheck__(cls, instance):
        return True
    __match_args__ = ("__self__",)

class Probe(metaclass=Forge):
    pass

def steal(bound):
    match bound:
        case Probe(owner):
            return owner.__reduce__()
"""


def test_poc_chain_is_rejected_at_every_step() -> None:
    assert messages(POC) == [
        f"Line 1: Global declaration of '__builtins__' is disallowed, {BYPASS}",
        attr_msg(4, "__import__"),
        f"Line 7: Function named '__builtins__' is disallowed, {BYPASS}",
        attr_msg(13, "__self__"),
        f"Line 20: {POSITIONAL}",
        attr_msg(21, "__reduce__"),
    ]


# -- exemption and errors ---------------------------------------------------------------


def test_allow_all_skips_everything_even_syntax() -> None:
    assert analyze("import os\nx = y.__class__\n__builtins__\nfrom . import z", ALL) == ()
    assert analyze("return [", ALL) == ()


def test_wildcard_on_one_side_still_checks() -> None:
    policy = ImportPolicy(frozenset({"*"}), frozenset())
    assert messages("import os\nx = y.__class__", policy) == [attr_msg(2, "__class__")]


def test_syntax_error_is_raised_unchanged() -> None:
    with pytest.raises(SyntaxError) as caught:
        analyze("return [", NONE)
    assert str(caught.value) == "'[' was never closed (<unknown>, line 1)"


def test_parser_recursion_becomes_a_syntax_error() -> None:
    with pytest.raises(SyntaxError, match="recursion"):
        analyze("x = " + "+".join(["'a'"] * 5000), NONE)


def test_deep_trees_and_templates_do_not_exhaust_the_stack() -> None:
    # n8n's recursive visitor fails well below these depths.
    assert analyze("x = " + "+".join(["'a'"] * 800), NONE) == ()
    template = "{:" * 3000 + "{0.__class__}" + "}" * 3000
    assert messages(f"x = '{template}'") == [pattern_msg(1, "__class__")]


# -- the string scanner ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("__builtins__", (("name", "__builtins__"),), id="name-wins-over-attribute"),
        pytest.param("__class__", (("attribute", "__class__"),), id="attribute"),
        pytest.param(
            "{0.__class__}{1[obj]}",
            (("pattern", "__class__"), ("pattern", "obj")),
            id="patterns",
        ),
        pytest.param("{0.real} object", (), id="harmless"),
        pytest.param("{0.__class__", (), id="unparsable"),
    ],
)
def test_scan_string(text: str, expected: tuple[tuple[str, str], ...]) -> None:
    assert scan_string(text) == expected
    assert blocked_token(text) == (expected[0] if expected else None)


def test_format_template_tokens_only_look_inside_fields() -> None:
    assert format_template_tokens("__class__") == ()
    assert format_template_tokens("{x.__dict__!r:{y[__spec__]}}") == ("__dict__", "__spec__")
    assert string_pattern_message("__dict__") == (
        f"String pattern accessing '__dict__' is disallowed, {BYPASS}"
    )


# -- wrapping and the format rewrite (5.2, 6.5) ---------------------------------------------


def run_wrapped(code: str, **names: Any) -> Any:
    scope: dict[str, Any] = {SAFE_FORMAT_NAME: _plain_format, **names}
    exec(wrap_user_code(code, ALL_ITEMS_FILENAME), scope)
    return scope[RESULT_NAME]


def _plain_format(method: str, receiver: Any, *args: Any, **kwargs: Any) -> Any:
    return getattr(receiver, method)(*args, **kwargs)


def test_wrapped_code_returns_into_the_result_global() -> None:
    assert run_wrapped("return [{'x': len(_items)}]", _items=[1, 2]) == [{"x": 2}]
    assert run_wrapped("x = 1") is None
    assert run_wrapped("") is None
    assert run_wrapped("# only a comment\n") is None


def test_wrapped_code_keeps_the_user_s_line_numbers() -> None:
    code = "x = 1\n\ndef inner():\n    raise ValueError('boom')\n\ninner()"
    with pytest.raises(ValueError, match="boom") as caught:
        run_wrapped(code)
    frames = [
        (frame.lineno, frame.name, frame.line)
        for frame in traceback.extract_tb(caught.value.__traceback__)
        if frame.filename == ALL_ITEMS_FILENAME
    ]
    assert frames[1:] == [
        (6, "_user_function", "inner()"),
        (4, "inner", "raise ValueError('boom')"),
    ]
    assert frames[0][1] == "<module>"
    assert frames[0][2] == ""  # the call itself shows no user line


def test_wrapped_code_registers_its_source_for_tracebacks() -> None:
    wrap_user_code("a = 1\r\nb = 2\rc = 3", PER_ITEM_FILENAME)
    assert linecache.getline(PER_ITEM_FILENAME, 2) == "b = 2\n"
    assert linecache.getline(PER_ITEM_FILENAME, 3) == "c = 3\n"
    linecache.checkcache()
    assert linecache.getline(PER_ITEM_FILENAME, 1) == "a = 1\n"


def test_wrapping_keeps_multiline_strings_intact() -> None:
    # n8n indents the source text, which adds four spaces inside such literals.
    assert run_wrapped('return """a\nb\n  c"""') == "a\nb\n  c"


def test_wrapped_code_does_not_inherit_future_flags() -> None:
    assert run_wrapped("def f(x: 1 + 1):\n    pass\nreturn f.__annotations__['x']") == 2


def test_wrapped_code_syntax_error_names_the_sentinel_and_user_line() -> None:
    with pytest.raises(SyntaxError) as caught:
        wrap_user_code("x = 1\ny = (", ALL_ITEMS_FILENAME)
    assert caught.value.filename == ALL_ITEMS_FILENAME
    assert caught.value.lineno == 2


def test_wrapped_code_compiles_as_a_function_body() -> None:
    with pytest.raises(SyntaxError, match="nonlocal"):
        wrap_user_code("nonlocal x", ALL_ITEMS_FILENAME)
    assert run_wrapped("yield 1\nyield 2").__class__.__name__ == "generator"


def test_format_calls_go_through_the_safe_format_global() -> None:
    calls: list[tuple[Any, ...]] = []

    def recorder(method: str, receiver: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((method, receiver, args, kwargs))
        return _plain_format(method, receiver, *args, **kwargs)

    code = (
        "a = '{}-{k}'.format(1, k=2)\n"
        "b = '{x}'.format_map({'x': 3})\n"
        "c = [str(n) for n in ['{}'.format(4)]]\n"
        "return a, b, c"
    )
    scope: dict[str, Any] = {SAFE_FORMAT_NAME: recorder}
    exec(wrap_user_code(code, ALL_ITEMS_FILENAME), scope)
    assert scope[RESULT_NAME] == ("1-2", "3", ["4"])
    assert calls == [
        ("format", "{}-{k}", (1,), {"k": 2}),
        ("format_map", "{x}", ({"x": 3},), {}),
        ("format", "{}", (4,), {}),
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param(
            "x.format(1, *a, k=2, **kw)",
            "__sandbox_safe_format__('format', x, 1, *a, k=2, **kw)",
            id="all-argument-kinds",
        ),
        pytest.param(
            "Formatter.vformat(f, t, a, k)",
            "__sandbox_safe_format__('vformat', Formatter, f, t, a, k)",
            id="unbound",
        ),
        pytest.param(
            "a.format(b.get_field(c))",
            "__sandbox_safe_format__('format', a, __sandbox_safe_format__('get_field', b, c))",
            id="nested",
        ),
        pytest.param("format(x, 'spec')", "format(x, 'spec')", id="builtin-format-untouched"),
        pytest.param("x.formats(1)", "x.formats(1)", id="other-methods-untouched"),
    ],
)
def test_format_call_rewriter(source: str, expected: str) -> None:
    tree = FormatCallRewriter().visit(ast.parse(source))
    assert ast.unparse(ast.fix_missing_locations(tree)) == expected
