"""The static analyzer and the code wrapper, shared by the runner and the task image.

Owns: n8n's blocklists and their exact error texts (reference 6.2), the import
allowlist check (6.3), the string and format-template scanner, the static checks
themselves, the rewrite of ``.format``-family calls (6.5) and the wrapping of a
task's code (a function *body*) into a module that stores its return value.

Standard library only, and nothing from ``runner``: this file is copied verbatim
into the task image as ``sandbox_agent/analyzer_core.py``, so that the runner
(before any container exists) and the in-container agent run the very same checks
from one source. Keep it importable on its own.

None of this is a security boundary. A denylist over CPython's object model is a
speed bump that keeps n8n's users' expectations (same messages, same rejections);
the container around the task is the wall.
"""

from __future__ import annotations

import ast
import linecache
import re
import string
import sys
import types

# Names for the type checker only: every task container's agent imports this module
# at its start, and ``typing`` (with ``collections.abc``) costs it ~2 ms of CPU for
# annotations that ``from __future__ import annotations`` never evaluates. mypy reads
# any ``TYPE_CHECKING`` as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, NoReturn

# -- names ------------------------------------------------------------------------

#: The global the format rewrite calls (n8n calls it ``__n8n_internal_safe_format__``).
SAFE_FORMAT_NAME = "__sandbox_safe_format__"
#: n8n's name for the same global; blocked too, so code written against n8n's
#: runner cannot probe for it either.
N8N_SAFE_FORMAT_NAME = "__n8n_internal_safe_format__"
#: The module global that receives the user function's return value.
RESULT_NAME = "__sandbox_result__"
#: The function the task body is wrapped in (n8n's name, visible in tracebacks).
USER_FUNCTION_NAME = "_user_function"

#: Sentinel filenames of compiled task code (n8n's), shown in tracebacks.
ALL_ITEMS_FILENAME = "<all_items_task_execution>"
PER_ITEM_FILENAME = "<per_item_task_execution>"

#: Error message of a rejected task (static analysis: plural, as n8n sends it).
SECURITY_VIOLATIONS_MESSAGE = "Security violations detected"
#: Error message of a runtime guard stopping a task (singular, as n8n sends it).
SECURITY_VIOLATION_MESSAGE = "Security violation detected"

# Names that reach the real builtins or module metadata, or our own machinery
# (overriding the result or the safe-format global would disable the guard).
BLOCKED_NAMES: frozenset[str] = frozenset(
    {
        "__loader__",
        "__builtins__",
        "__globals__",
        "__spec__",
        "__name__",
        N8N_SAFE_FORMAT_NAME,
        SAFE_FORMAT_NAME,
        RESULT_NAME,
    }
)

# Exactly n8n 2.27.4's set. Every entry is a known step of some escape chain.
BLOCKED_ATTRIBUTES: frozenset[str] = frozenset(
    {
        # frames, tracebacks, generators, coroutines, super objects
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
        "obj",  # AttributeError.obj hands back the object a lookup failed on
        "__thisclass__",
        "__self_class__",
        "__objclass__",
        # serialization
        "__reduce__",
        "__reduce_ex__",
        # metaclasses
        "__prepare__",
        # the match protocol (forged isinstance checks and positional extraction)
        "__instancecheck__",
        "__subclasscheck__",
        "__match_args__",
        # introspection
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
)

#: n8n's default ``N8N_RUNNERS_BUILTINS_DENY``, in n8n's order.
DEFAULT_BUILTINS_DENY: tuple[str, ...] = (
    "eval",
    "exec",
    "compile",
    "open",
    "input",
    "breakpoint",
    "getattr",
    "object",
    "type",
    "vars",
    "setattr",
    "delattr",
    "hasattr",
    "dir",
    "memoryview",
    "__build_class__",
    "globals",
    "locals",
    "license",
    "help",
    "credits",
    "copyright",
)

#: Methods that walk attributes named inside a template (``"{0.__globals__}"``).
FORMAT_METHODS = frozenset({"format", "format_map", "vformat", "get_field"})

# -- n8n's texts (every one is compared verbatim by users and tests) ----------------

_RELATIVE_IMPORT = "Relative imports are disallowed."
_STDLIB_DISALLOWED = (
    "Import of standard library module '{module}' is disallowed. Allowed stdlib modules: {allowed}"
)
_EXTERNAL_DISALLOWED = (
    "Import of external package '{module}' is disallowed. Allowed external packages: {allowed}"
)
_BYPASS = "because it can be used to bypass security restrictions."
_DANGEROUS_NAME = "Access to name '{}' is disallowed, " + _BYPASS
_DANGEROUS_ATTRIBUTE = "Access to attribute '{}' is disallowed, " + _BYPASS
_STRING_PATTERN = "String pattern accessing '{}' is disallowed, " + _BYPASS
_NAME_MANGLED = (
    "Access to name-mangled attributes (pattern: _ClassName__attr) is disallowed for "
    "security reasons."
)
_DYNAMIC_IMPORT = "Dynamic __import__() calls are not allowed for security reasons."
_MATCH_ATTRIBUTE = "Match pattern extracting attribute '{}' is disallowed, " + _BYPASS
_MATCH_POSITIONAL = "Positional match patterns are disallowed for security reasons."
# Ours, not n8n's (its 2.27.4 lets ``random._os`` through): an allowlisted module must
# not hand out what the allowlist refuses. Private names of what an import bound are
# where modules keep their own imports (``random._os``, ``json.decoder._json``).
_PRIVATE_ATTRIBUTE = (
    "Access to private attribute '{}' of imported name '{}' is disallowed, " + _BYPASS
)
_PRIVATE_IMPORT = "Import of private name '{}' from '{}' is disallowed, " + _BYPASS
_GLOBAL_NAME = "Global declaration of '{}' is disallowed, " + _BYPASS
_FUNCTION_NAME = "Function named '{}' is disallowed, " + _BYPASS
_CLASS_NAME = "Class named '{}' is disallowed, " + _BYPASS
_PARAMETER_NAME = "Parameter named '{}' is disallowed, " + _BYPASS
_CONCATENATION_TOO_LARGE = (
    "String concatenation too large to analyze; build long strings another way "
    "(for example with ''.join)."
)
# Characters the analyzer may build while folding ``"a" + "b" + ...`` chains. Every
# intermediate sum of a chain is kept and scanned, so a chain of n literals costs
# O(n^2): without a budget, 2 MB of code would cost gigabytes and seconds of the
# runner's event loop. Past it the code is rejected (fail closed), not half-scanned.
FOLD_BUDGET_CHARS = 8 * 1024 * 1024
_BARE_FORMAT = (
    "Extracting '{}' as a bound method is disallowed; call it directly on its receiver instead."
)

_IMPORT_CALL_RECEIVERS = frozenset({"builtins", "__builtins__"})


def string_pattern_message(token: str) -> str:
    """n8n's text for a format template naming ``token`` (static and runtime)."""
    return _STRING_PATTERN.format(token)


# -- import allowlists (6.3) --------------------------------------------------------


def parse_allowlist(raw: str, variable: str) -> frozenset[str]:
    """Parse ``N8N_RUNNERS_STDLIB_ALLOW``-style text: comma list, trimmed, ``*`` alone."""
    entries = frozenset(entry.strip() for entry in raw.split(",")) - {""}
    if "*" in entries and len(entries) > 1:
        raise ValueError(
            f"Wildcard '*' in {variable} must be used alone, not with other modules. "
            f"Got: {', '.join(sorted(entries))}"
        )
    return entries


class _Record:
    """What ``@dataclass(frozen=True, slots=True)`` gives a class, written out.

    Equality (same class, same field values), a hash of the field values, the
    dataclass ``repr``, pickling, and no assignment after ``__init__``: the fields are
    a subclass's ``__match_args__``, which is also its ``__slots__``. Not a dataclass
    because the agent imports this module at the start of every task container, and
    ``dataclasses`` (with ``inspect``, ``dis`` and ``copy`` beneath it) was ~6 ms of
    that start's CPU.
    """

    __slots__ = ()
    __match_args__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(object.__getattribute__(self, name) for name in self.__match_args__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Record) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={object.__getattribute__(self, name)!r}" for name in self.__match_args__
        )
        return f"{self.__class__.__qualname__}({fields})"

    def __reduce__(self) -> tuple[type[_Record], tuple[object, ...]]:
        return self.__class__, self._values()

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"cannot delete field {name!r}")


class ImportPolicy(_Record):
    """Which modules task code may import, by top-level name (``*`` = all of a kind)."""

    __slots__ = __match_args__ = ("stdlib_allow", "external_allow")
    stdlib_allow: frozenset[str]
    external_allow: frozenset[str]

    def __init__(
        self,
        stdlib_allow: frozenset[str] = frozenset(),
        external_allow: frozenset[str] = frozenset(),
    ) -> None:
        object.__setattr__(self, "stdlib_allow", stdlib_allow)
        object.__setattr__(self, "external_allow", external_allow)

    @property
    def allows_everything(self) -> bool:
        """Both lists are ``*``: n8n then skips static analysis altogether."""
        return self.stdlib_allow == {"*"} and self.external_allow == {"*"}

    def cache_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(sorted(self.stdlib_allow)), tuple(sorted(self.external_allow))

    @classmethod
    def from_env_strings(cls, stdlib: str, external: str) -> ImportPolicy:
        return cls(
            parse_allowlist(stdlib, "N8N_RUNNERS_STDLIB_ALLOW"),
            parse_allowlist(external, "N8N_RUNNERS_EXTERNAL_ALLOW"),
        )


def import_error(module: str, policy: ImportPolicy) -> str | None:
    """``None`` when ``module`` may be imported, else n8n's error text.

    Only the top-level name counts: allowing ``os`` allows ``os.path``. A module is
    standard library when its top-level name is in ``sys.stdlib_module_names``.
    """
    top = module.split(".", 1)[0]
    if top in sys.stdlib_module_names:
        allowed, template = policy.stdlib_allow, _STDLIB_DISALLOWED
    else:
        allowed, template = policy.external_allow, _EXTERNAL_DISALLOWED
    if "*" in allowed or top in allowed:
        return None
    listed = ", ".join(sorted(allowed)) if allowed else "none"
    return template.format(module=module, allowed=listed)


# -- the string scanner -------------------------------------------------------------

_FORMATTER = string.Formatter()
# Inside a replacement field: ``.name`` attribute steps and ``[name]`` / ``['name']``
# keys. Deliberately looser than str.format's own grammar (a ``.x`` inside brackets
# counts too): over-matching a template costs nothing, under-matching is a bypass.
_FIELD_ATTRIBUTE = re.compile(r"\.(\w+)")
_FIELD_KEY = re.compile(r"\[(['\"]?)(\w+)\1\]")
_DANGEROUS_TOKENS = BLOCKED_NAMES | BLOCKED_ATTRIBUTES

NAME = "name"
ATTRIBUTE = "attribute"
PATTERN = "pattern"


def _template_fields(template: str) -> list[tuple[str | None, str | None]] | None:
    try:
        return [(field, spec) for _, field, spec, _ in _FORMATTER.parse(template)]
    except (ValueError, IndexError):
        return None  # not a valid template: str.format would refuse it too


def format_template_tokens(template: str) -> tuple[str, ...]:
    """Blocked names and attributes that ``str.format(template, ...)`` would walk to.

    Every ``.attr`` and ``[key]`` of every replacement field counts, including the
    fields of nested format specs (``"{0:{1.__class__}}"``), in template order.
    Unparsable templates yield nothing. The walk uses an explicit stack, so that a
    pathologically nested template cannot exhaust the interpreter's recursion limit.
    """
    found: list[str] = []
    top = _template_fields(template)
    stack: list[Iterator[tuple[str | None, str | None]]] = [iter(top)] if top else []
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        field, spec = entry
        if field:
            attributes = (m[1] for m in _FIELD_ATTRIBUTE.finditer(field))
            keys = (m[2] for m in _FIELD_KEY.finditer(field))
            found.extend(token for token in attributes if token in _DANGEROUS_TOKENS)
            found.extend(token for token in keys if token in _DANGEROUS_TOKENS)
        if spec:
            nested = _template_fields(spec)
            if nested:
                stack.append(iter(nested))
    return tuple(found)


def scan_string(text: str) -> tuple[tuple[str, str], ...]:
    """Every reason ``text`` is dangerous, as ``(kind, token)`` pairs in n8n's order.

    ``kind`` is ``"name"`` or ``"attribute"`` when the whole text is a blocked name
    or attribute (then nothing else is reported), otherwise ``"pattern"`` for each
    blocked token its format fields name. Empty when the text is harmless.
    """
    if text in BLOCKED_NAMES:
        return ((NAME, text),)
    if text in BLOCKED_ATTRIBUTES:
        return ((ATTRIBUTE, text),)
    return tuple((PATTERN, token) for token in format_template_tokens(text))


def blocked_token(text: str) -> tuple[str, str] | None:
    """The first ``(kind, token)`` of :func:`scan_string`, or ``None``."""
    hits = scan_string(text)
    return hits[0] if hits else None


def _string_message(kind: str, token: str) -> str:
    if kind == NAME:
        return _DANGEROUS_NAME.format(token)
    if kind == ATTRIBUTE:
        return _DANGEROUS_ATTRIBUTE.format(token)
    return string_pattern_message(token)


# -- static analysis (6.2) ----------------------------------------------------------


class Violation(_Record):
    """One reason to reject a task; ``str()`` is n8n's ``Line N: <reason>``."""

    __slots__ = __match_args__ = ("line", "message")
    line: int
    message: str

    def __init__(self, line: int, message: str) -> None:
        object.__setattr__(self, "line", line)
        object.__setattr__(self, "message", message)

    def __str__(self) -> str:
        return f"Line {self.line}: {self.message}"


def _walk(tree: ast.AST) -> list[ast.AST]:
    """Every node, parents before children, children in field order.

    The same order as ``ast.NodeVisitor`` (so violations come out in n8n's order),
    but iterative: deeply nested code cannot crash the analyzer.
    """
    order: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return order


def _fold_concatenations(nodes: list[ast.AST]) -> tuple[dict[ast.AST, str], ast.AST | None]:
    """The value of every ``+`` tree made only of string literals (``"__cla" + "ss__"``).

    Stops at :data:`FOLD_BUDGET_CHARS` and returns the node where it stopped (else None).
    """
    folded: dict[ast.AST, str] = {}
    budget = FOLD_BUDGET_CHARS
    for node in reversed(nodes):  # children before their parents
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = _literal(node.left, folded), _literal(node.right, folded)
            if left is not None and right is not None:
                budget -= len(left) + len(right)
                if budget < 0:
                    return folded, node
                folded[node] = left + right
    return folded, None


def _is_private(name: str) -> bool:
    """``_name`` but not ``__dunder__`` (dunders have their own list: BLOCKED_ATTRIBUTES)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imported_names(nodes: list[ast.AST]) -> frozenset[str]:
    """Every name an ``import`` binds anywhere in the task (``import a.b`` binds ``a``).

    Scopes are not tracked: a name imported anywhere counts everywhere, which can only
    refuse more (a later ``random = 5`` still counts as the module).
    """
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.asname or alias.name.split(".", 1)[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names if alias.name != "*")
    return frozenset(names)


def _chain_root(node: ast.Attribute) -> str | None:
    """``a`` of ``a.b.c`` (a dotted chain of names), else ``None`` (``f().x``)."""
    value = node.value
    while isinstance(value, ast.Attribute):
        value = value.value
    return value.id if isinstance(value, ast.Name) else None


def _literal(node: ast.AST, folded: dict[ast.AST, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return folded.get(node)


class _Checker:
    """Runs every check of reference 6.2 over a parsed task, in tree order."""

    def __init__(self, policy: ImportPolicy) -> None:
        self._policy = policy
        self._checked_modules: set[str] = set()
        self._called_attributes: set[ast.AST] = set()
        self._folded: dict[ast.AST, str] = {}
        self._imported: frozenset[str] = frozenset()
        self.violations: list[Violation] = []
        self._checks: dict[type[ast.AST], Callable[[Any], None]] = {
            ast.Import: self._import,
            ast.ImportFrom: self._import_from,
            ast.Name: self._name,
            ast.Attribute: self._attribute,
            ast.Call: self._call,
            ast.Subscript: self._subscript,
            ast.Constant: self._constant,
            ast.BinOp: self._binop,
            ast.Global: self._global,
            ast.FunctionDef: self._function,
            ast.AsyncFunctionDef: self._function,
            ast.ClassDef: self._class,
            ast.ExceptHandler: self._except_handler,
            ast.arg: self._parameter,
            ast.MatchClass: self._match_class,
        }

    def run(self, tree: ast.AST) -> None:
        nodes = _walk(tree)
        self._imported = _imported_names(nodes)
        self._folded, stopped_at = _fold_concatenations(nodes)
        if stopped_at is not None:
            self._add(getattr(stopped_at, "lineno", 1), _CONCATENATION_TOO_LARGE)
            return
        for node in nodes:
            check = self._checks.get(type(node))
            if check is not None:
                check(node)

    def _add(self, line: int, message: str) -> None:
        self.violations.append(Violation(line, message))

    # imports

    def _check_module(self, module: str, line: int) -> None:
        if module.startswith("."):
            self._add(line, _RELATIVE_IMPORT)
            return
        top = module.split(".", 1)[0]
        if top in self._checked_modules:
            return  # n8n reports each top-level name once per task
        self._checked_modules.add(top)
        error = import_error(module, self._policy)
        if error is not None:
            self._add(line, error)

    def _check_binding(self, name: str | None, line: int) -> bool:
        """An imported name bound to a blocked name; True when reported."""
        if name is None:
            return False
        if name in BLOCKED_NAMES:
            self._add(line, _DANGEROUS_NAME.format(name))
            return True
        if name in BLOCKED_ATTRIBUTES:
            # ``from m import __dict__`` reads the attribute without an Attribute node.
            self._add(line, _DANGEROUS_ATTRIBUTE.format(name))
            return True
        return False

    def _import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(alias.name, node.lineno)
            self._check_binding(alias.asname, node.lineno)

    def _import_from(self, node: ast.ImportFrom) -> None:
        if node.level > 0:
            self._add(node.lineno, _RELATIVE_IMPORT)
        elif node.module:
            self._check_module(node.module, node.lineno)
        for alias in node.names:
            if self._check_binding(alias.asname, node.lineno):
                continue
            if not self._check_binding(alias.name, node.lineno) and _is_private(alias.name):
                self._add(node.lineno, _PRIVATE_IMPORT.format(alias.name, node.module or "."))

    # names and attributes

    def _name(self, node: ast.Name) -> None:
        if node.id in BLOCKED_NAMES:
            self._add(node.lineno, _DANGEROUS_NAME.format(node.id))

    def _attribute(self, node: ast.Attribute) -> None:
        attr = node.attr
        if attr in BLOCKED_ATTRIBUTES:
            self._add(node.lineno, _DANGEROUS_ATTRIBUTE.format(attr))
        if attr in FORMAT_METHODS and node not in self._called_attributes:
            # A bound ``"{0.__globals__}".format`` could be called where the
            # rewrite (6.5) does not see it, e.g. through map().
            self._add(node.lineno, _BARE_FORMAT.format(attr))
        if attr.startswith("_") and "__" in attr and attr.split("__", 1)[0].startswith("_"):
            self._add(node.lineno, _NAME_MANGLED)
        elif _is_private(attr):
            root = _chain_root(node)
            if root is not None and root in self._imported:
                self._add(node.lineno, _PRIVATE_ATTRIBUTE.format(attr, root))

    def _call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in FORMAT_METHODS:
            self._called_attributes.add(func)  # seen before the attribute itself
        is_import_call = (isinstance(func, ast.Name) and func.id == "__import__") or (
            isinstance(func, ast.Attribute)
            and func.attr == "__import__"
            and isinstance(func.value, ast.Name)
            and func.value.id in _IMPORT_CALL_RECEIVERS
        )
        if not is_import_call:
            return
        first = node.args[0] if node.args else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            self._check_module(first.value, node.lineno)
        else:
            self._add(node.lineno, _DYNAMIC_IMPORT)

    def _subscript(self, node: ast.Subscript) -> None:
        target = node.value
        on_builtins = (isinstance(target, ast.Name) and target.id in _IMPORT_CALL_RECEIVERS) or (
            isinstance(target, ast.Attribute) and target.attr in _IMPORT_CALL_RECEIVERS
        )
        key = node.slice
        if (
            on_builtins
            and isinstance(key, ast.Constant)
            and isinstance(key.value, str)
            and key.value in BLOCKED_ATTRIBUTES
        ):
            self._add(node.lineno, _DANGEROUS_ATTRIBUTE.format(key.value))

    # strings

    def _scan(self, text: str, line: int) -> None:
        for kind, token in scan_string(text):
            self._add(line, _string_message(kind, token))

    def _constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):  # bytes are not checked, as in n8n
            self._scan(node.value, node.lineno)

    def _binop(self, node: ast.BinOp) -> None:
        value = self._folded.get(node)
        if value is not None:
            self._scan(value, node.lineno)

    # bindings that would shadow the builtins or our globals

    def _global(self, node: ast.Global) -> None:
        for name in node.names:
            if name in BLOCKED_NAMES:
                self._add(node.lineno, _GLOBAL_NAME.format(name))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if node.name in BLOCKED_NAMES:
            self._add(node.lineno, _FUNCTION_NAME.format(node.name))

    def _class(self, node: ast.ClassDef) -> None:
        if node.name in BLOCKED_NAMES:
            self._add(node.lineno, _CLASS_NAME.format(node.name))

    def _except_handler(self, node: ast.ExceptHandler) -> None:
        if node.name and node.name in BLOCKED_NAMES:
            self._add(node.lineno, _DANGEROUS_NAME.format(node.name))

    def _parameter(self, node: ast.arg) -> None:
        if node.arg in BLOCKED_NAMES:
            self._add(node.lineno, _PARAMETER_NAME.format(node.arg))

    def _match_class(self, node: ast.MatchClass) -> None:
        if node.patterns:
            # Positional sub-patterns read ``__match_args__``, which a forged class
            # can point at any attribute (``__self__`` of a bound method...).
            self._add(node.lineno, _MATCH_POSITIONAL)
        for attr in node.kwd_attrs:
            if attr in BLOCKED_ATTRIBUTES:
                self._add(node.lineno, _MATCH_ATTRIBUTE.format(attr))


def analyze(code: str, policy: ImportPolicy) -> tuple[Violation, ...]:
    """Every violation in ``code`` (a function body), in n8n's order and texts.

    Raises the ``SyntaxError`` of ``ast.parse`` unchanged (and turns the parser's
    other refusals into one). When both allowlists are
    ``*`` nothing is checked at all, not even the syntax (n8n's exemption).
    """
    if policy.allows_everything:
        return ()
    try:
        tree = ast.parse(code)
    except (RecursionError, ValueError, MemoryError) as exc:
        # Deeply nested expressions (RecursionError; 3.11's parser says MemoryError
        # when its own stack overflows, e.g. on 100,000 unary minus signs), a NUL byte
        # (3.11 raises ValueError where 3.12+ raises SyntaxError) or a lone surrogate
        # (UnicodeEncodeError): a syntax error for the caller, not a crash of the runner.
        raise SyntaxError(str(exc) or "code is nested too deeply to parse") from None
    checker = _Checker(policy)
    checker.run(tree)
    return tuple(checker.violations)


# -- the format rewrite (6.5) and the wrapper (5.2) ---------------------------------


class FormatCallRewriter(ast.NodeTransformer):
    """``recv.format(*a, **k)`` -> ``__sandbox_safe_format__("format", recv, *a, **k)``.

    A template built at runtime escapes the static scan; the injected guard checks
    it at the moment of the call. f-strings need no rewrite: their expressions are
    ordinary AST nodes, checked statically.
    """

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr in FORMAT_METHODS):
            return node
        guarded = ast.Call(
            func=ast.Name(id=SAFE_FORMAT_NAME, ctx=ast.Load()),
            args=[ast.Constant(value=func.attr), func.value, *node.args],
            keywords=node.keywords,
        )
        return ast.copy_location(guarded, node)


def _source_lines(code: str) -> list[str]:
    # The tokenizer's notion of a line (\n, \r\n or \r), not str.splitlines's.
    text = code.replace("\r\n", "\n").replace("\r", "\n")
    if text.endswith("\n"):
        text = text[:-1]
    return [line + "\n" for line in text.split("\n")] if code else []


def register_source(code: str, filename: str) -> None:
    """Make tracebacks of ``filename`` show the task's own source lines."""
    lines = _source_lines(code)
    # mtime None: linecache.checkcache never evicts the entry.
    linecache.cache[filename] = (len(code), None, lines, filename)


def wrap_user_code(code: str, filename: str) -> types.CodeType:
    """Compile a task body as ``def _user_function(): <code>`` plus a call storing
    its return value in the global ``__sandbox_result__``.

    The function is built on the parsed tree instead of indenting the text (what
    n8n does), so every line number is exactly the user's own and multi-line
    string literals keep their content. ``.format``-family calls are rewritten
    (:class:`FormatCallRewriter`).
    """
    tree = ast.parse(code, filename=filename)
    last_line = max(1, len(_source_lines(code)))
    function = ast.FunctionDef(
        name=USER_FUNCTION_NAME,
        args=ast.arguments(
            posonlyargs=[],
            args=[],
            vararg=None,
            kwonlyargs=[],
            kw_defaults=[],
            kwarg=None,
            defaults=[],
        ),
        body=tree.body or [ast.Pass()],
        decorator_list=[],
        returns=None,
        type_comment=None,
        lineno=1,
        col_offset=0,
        end_lineno=last_line,
        end_col_offset=0,
    )
    if sys.version_info >= (3, 12):  # pragma: no cover - the image runs 3.11
        function.type_params = []
    # The call is placed after the last line: its traceback frame then shows no
    # user line it did not write.
    call = ast.Assign(
        targets=[ast.Name(id=RESULT_NAME, ctx=ast.Store())],
        value=ast.Call(func=ast.Name(id=USER_FUNCTION_NAME, ctx=ast.Load()), args=[], keywords=[]),
        lineno=last_line + 1,
        col_offset=0,
        end_lineno=last_line + 1,
        end_col_offset=0,
    )
    module = ast.Module(body=[function, call], type_ignores=[])
    module = FormatCallRewriter().visit(module)
    ast.fix_missing_locations(module)
    register_source(code, filename)
    # dont_inherit: this file's ``from __future__`` flags must not leak into task code.
    return compile(module, filename, "exec", dont_inherit=True)
