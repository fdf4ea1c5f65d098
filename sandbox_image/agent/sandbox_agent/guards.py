"""Runtime guards of the task child: what task code gets instead of the real thing.

Owns (reference 5.7, 6.4, 6.5): the filtered, read-only builtins; the guarded
``__import__`` and the ``importlib`` entry points; the purge of ``sys.modules``;
the read-only module proxies task code gets instead of the modules it imports;
the capturing ``print``; the safe-format entry the format rewrite calls; and the
hardened callables that carry them.

All of this is a speed bump, not a wall. An in-process denylist over CPython
cannot be complete. But an allowlisted module must not hand out a module that is
not allowlisted: ``random._os``, ``uuid.os``, ``re.enum.sys``, ``enum.bltns`` and
``dataclasses.inspect`` all did (n8n's runner has the same hole). Task code
therefore gets a :class:`ModuleProxy` for every module it imports: private names
are refused, and a module found on it passes the import allowlist or is refused
(an allowlisted one comes back as a proxy too). The static analyzer refuses
``random._os`` before the task runs; the proxy catches what it cannot see
(``r = random; r._os`` is still refused, here). The guards exist so that n8n users
get n8n's behaviour and error texts, and so that the casual and the scripted
attempts fail early and loudly. The container around the task (no network,
read-only root, seccomp, caps dropped, limits) is the wall.

Standard library only. The analyzer core is imported as ``.analyzer_core``: it is
``runner/analyzer/core.py``, copied next to this file when the image is built.
"""

from __future__ import annotations

import builtins as _builtins
import contextlib
import importlib
import importlib.util
import json
import sys
import types

from .analyzer_core import (
    FORMAT_METHODS,
    SAFE_FORMAT_NAME,
    SECURITY_VIOLATION_MESSAGE,
    ImportPolicy,
    format_template_tokens,
    import_error,
    string_pattern_message,
)

# Names for the type checker only (``typing`` costs the agent's start ~2 ms of CPU;
# these annotations are never evaluated). mypy reads any ``TYPE_CHECKING`` as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any, ClassVar, NoReturn

DEFAULT_MAX_PRINT_CALLS = 100  # n8n's MAX_PRINT_ARGS_ALLOWED

# Modules the interpreter and the agent cannot do without (n8n keeps the same set),
# and ``ast``: ``traceback`` imports it to place the carets under the user's line
# (3.11+). Purged, every user error paid a fresh import of ast with contextlib,
# collections, functools and enum beneath it (~10 ms of the child's CPU). And
# ``abc``: kept modules (``collections.abc``, ``typing``) hold classes made by its
# ``ABCMeta``; purged, a package imported afterwards (pandas) got a second ``abc``
# with a second ``ABCMeta``, and ``class X(Iterator[T], ABC)`` failed with a
# metaclass conflict. Task code still imports these only if the allowlist says so;
# the guard checks the name, not ``sys.modules``.
_ALWAYS_KEPT_MODULES = frozenset(
    {
        "builtins",
        "__main__",
        "sys",
        "traceback",
        "linecache",
        "importlib",
        "importlib.machinery",
        "ast",
        "abc",
    }
)

# Helper modules that C code imports through the *caller's* ``__import__``: with
# task code on the stack that is the guard, so ``time.strptime`` would be refused
# "_strptime" although ``time`` is allowed. n8n refuses it (its tests run with
# ``*``); here a helper passes the task's ``__import__`` when a module that needs
# it is allowed (never the importlib guards). The static analyzer still rejects
# importing it by name. The cost: task code that calls ``__import__`` by another
# name can load ``_strptime`` itself, which reaches ``sys`` through ``locale`` --
# as ``datetime.sys`` and ``re``'s ``enum.sys`` already do.
_RUNTIME_HELPERS: Mapping[str, frozenset[str]] = {"_strptime": frozenset({"datetime", "time"})}

# Builtins never handed to task code, whatever the deny list says: the builtins
# module's own import metadata (``__loader__`` is BuiltinImporter, whose
# load_module("posix") is os without the import guard).
_NEVER_EXPOSED_BUILTINS = frozenset({"__loader__", "__spec__"})

_SPOOFED_TYPE = "builtin_function_or_method"


# -- errors -------------------------------------------------------------------------


class SecurityViolation(Exception):
    """A runtime guard stopped the task: n8n's ``SecurityViolationError``.

    ``message`` is always "Security violation detected" (singular: n8n's static
    analyzer uses the plural); ``description`` says what was refused.
    """

    def __init__(self, description: str, message: str = SECURITY_VIOLATION_MESSAGE) -> None:
        super().__init__(message)
        self.message = message
        self.description = description


class ImportRefused(SecurityViolation, ModuleNotFoundError):
    """The ``importlib`` guards' refusal: a security violation that library code
    takes for a missing module.

    Packages probe for optional dependencies with ``importlib.import_module`` inside
    ``except ImportError`` (pandas and ``pytz``): to them a module the allowlist
    refuses is a module that is not there, and they carry on without it. Nothing is
    loaded either way. Uncaught, it ends the task as any security violation does;
    the task's own ``import`` statement raises a plain :class:`SecurityViolation`.
    """

    def __init__(self, description: str) -> None:
        SecurityViolation.__init__(self, description)


class OutputLimitExceeded(BaseException):
    """Task code printed more than its output limit.

    A ``BaseException`` so that ``except Exception`` in task code does not swallow
    it; the agent's overflow callback normally ends the process before it is raised.
    """


def _no_attribute(name: str) -> AttributeError:
    # The same text for denied and missing names (no oracle), under the type name of
    # a real builtin function (no class identity). Setting ``name`` keeps CPython
    # from attaching ``obj`` (this very object) to the error as lookup context.
    return AttributeError(
        f"'{_SPOOFED_TYPE}' object has no attribute {str.__repr__(name)}", name=name
    )


# -- hardened callables -------------------------------------------------------------


class _Hardened:
    """Base of every callable handed to task code.

    Slot-only, and every attribute read raises the spoofed error of
    :func:`_no_attribute`, except the few names a subclass exposes on purpose (and
    those come back as hardened callables too, never as bound methods, whose
    ``__func__.__globals__`` would lead to this module). n8n denies a fixed list
    (``BLOCKED_ATTRIBUTES`` plus ``__call__ __init__ __new__ __doc__ __dir__
    __subclasshook__ __repr__`` and the slot names); denying everything is a strict
    superset, and also covers ``__getstate__``, which returns the slot values.
    Calls, ``repr`` and ``str`` go through type slots and keep working. Every set
    or delete is refused. Internals read slots with ``object.__getattribute__``.
    """

    __slots__ = ()
    _display_name: ClassVar[str] = "function"
    _exposed: ClassVar[frozenset[str]] = frozenset()

    def __getattribute__(self, name: str) -> Any:
        cls = type(self)
        if name in cls._exposed:
            return _HardenedMethod(self, getattr(cls, name), name)
        raise _no_attribute(name)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise _no_attribute(name)

    def __delattr__(self, name: str) -> NoReturn:
        raise _no_attribute(name)

    def __repr__(self) -> str:
        return f"<built-in function {type(self)._display_name}>"


class _HardenedMethod(_Hardened):
    """An exposed method, bound to its owner without exposing either."""

    __slots__ = ("_function", "_method_name", "_owner")

    def __init__(self, owner: object, function: Callable[..., Any], name: str) -> None:
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_function", function)
        object.__setattr__(self, "_method_name", name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        function = object.__getattribute__(self, "_function")
        return function(object.__getattribute__(self, "_owner"), *args, **kwargs)

    def __repr__(self) -> str:
        return f"<built-in method {object.__getattribute__(self, '_method_name')}>"


def _exact_str(value: object) -> str | None:
    """``value`` as an exact ``str`` (a subclass cannot lie through its methods)."""
    return str.__str__(value) if isinstance(value, str) else None


def _unwrap_import(function: Callable[..., Any]) -> Callable[..., Any]:
    """The original beneath any import guard, so that guards never stack.

    Works across re-imports of this module: the marker is looked up on the class of
    the object, whichever copy of :class:`ImportGuard` made it.
    """
    while getattr(type(function), "_wraps_an_import", False):
        function = object.__getattribute__(function, "_original")
    return function


class ImportGuard(_Hardened):
    """``__import__`` / ``importlib.import_module`` / ``importlib.__import__`` behind the
    allowlist (6.3, 6.4).

    Relative names are resolved before the check: against ``package`` (the string
    anchor of ``import_module``), or against ``globals["__package__"]`` when
    ``__import__`` gets ``level > 0``. Without a usable anchor the dotted name
    itself is checked, and refused: fail closed. The original receives the same
    arguments, except that a ``str`` subclass in the name or the anchor is replaced
    by a plain copy, so the check and the import see the same text.

    With ``proxy_modules`` (the task's own ``__import__``) the module comes back as a
    :class:`ModuleProxy`, unless the policy allows everything (n8n's exemption: no
    speed bumps at all) or it is a runtime helper imported for C code. The
    ``importlib`` entry points hand library code the real modules.
    """

    __slots__ = ("_helpers", "_original", "_policy", "_proxy_modules", "_refusal")
    _display_name = "__import__"
    _wraps_an_import: ClassVar[bool] = True

    def __init__(
        self,
        policy: ImportPolicy,
        original: Callable[..., Any],
        *,
        allow_runtime_helpers: bool = False,
        proxy_modules: bool = False,
    ) -> None:
        helpers = frozenset(
            helper
            for helper, owners in _RUNTIME_HELPERS.items()
            if any(import_error(owner, policy) is None for owner in owners)
        )
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_original", _unwrap_import(original))
        object.__setattr__(self, "_helpers", helpers if allow_runtime_helpers else frozenset())
        object.__setattr__(self, "_proxy_modules", proxy_modules and not policy.allows_everything)
        # The task's own import refuses with n8n's SecurityViolation; the importlib
        # entry points, which library code calls, with ImportRefused (also an
        # ImportError: an optional dependency outside the allowlist reads as absent).
        object.__setattr__(self, "_refusal", SecurityViolation if proxy_modules else ImportRefused)

    def __call__(self, name: object, *args: Any, **kwargs: Any) -> Any:
        module = _exact_str(name)
        if module is None:
            raise TypeError(f"module name must be str, not {type(name).__name__}")
        args, kwargs, target = _import_target(module, args, kwargs)
        policy = object.__getattribute__(self, "_policy")
        error = import_error(target, policy)
        if error is not None:
            if target not in object.__getattribute__(self, "_helpers"):
                refusal = object.__getattribute__(self, "_refusal")
                if refusal is ImportRefused and _called_by_task_code():
                    refusal = SecurityViolation  # n8n's, to task code calling importlib
                raise refusal(error)
            return object.__getattribute__(self, "_original")(module, *args, **kwargs)
        imported = object.__getattribute__(self, "_original")(module, *args, **kwargs)
        if object.__getattribute__(self, "_proxy_modules") and isinstance(
            imported, types.ModuleType
        ):
            return ModuleProxy(imported, policy)
        return imported


def _called_by_task_code() -> bool:
    """Whether the code calling the guard (two frames up) is the task's own: its
    globals hold the task's read-only builtins. It only chooses the exception class of
    a refusal (both refuse), so a frame that lies changes nothing that matters."""
    try:
        caller = sys._getframe(2)
    except ValueError:
        return False
    return type(caller.f_globals.get("__builtins__")) is ReadOnlyBuiltins


# Dunders of a module that hold what the allowlist refuses: every private name, the
# real builtins (with the real ``__import__``), a loader that loads any module. A
# module proxy reads them as missing; other dunders (``__name__``, ``__doc__``,
# ``__all__``, ``__class__`` for isinstance) pass, through the same module check.
_PROXY_HIDDEN_DUNDERS = frozenset(
    {
        "__dict__",
        "__builtins__",
        "__spec__",
        "__loader__",
        "__getattr__",
        "__getattribute__",
        "__setattr__",
        "__delattr__",
        "__dir__",
        "__reduce__",
        "__reduce_ex__",
        "__getstate__",
    }
)
_PRIVATE_ATTRIBUTE = (
    "Access to private attribute '{}' of module '{}' is disallowed, because it can be "
    "used to bypass security restrictions."
)


class ModuleProxy:
    """A read-only view of an allowlisted module: what task code gets from ``import``.

    An attribute read returns the module's attribute, except that a private name
    (``_os``) is refused with a :class:`SecurityViolation`, a dunder of
    :data:`_PROXY_HIDDEN_DUNDERS` reads as missing (``AttributeError``, so that
    ``getattr(x, "__dict__", None)`` in library code behaves), and a value that is
    a module passes the import allowlist first: an allowlisted one comes back as a
    proxy too (``collections.abc``, ``json.decoder``, ``re.enum``), any other is
    refused with the import check's own text (``uuid.os``, ``re.enum.sys``). Every
    set or delete is refused. The module is held in a slot that no attribute read
    reaches (its name is private). Values that are not modules come back as they are:
    a function's ``__globals__`` is refused by the static analyzer (both on the host
    and in the agent), not here.
    """

    __slots__ = ("_module", "_policy")

    def __init__(self, module: types.ModuleType, policy: ImportPolicy) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_policy", policy)

    def __getattribute__(self, name: str) -> Any:
        module = object.__getattribute__(self, "_module")
        text = _exact_str(name)
        if text is None:
            raise TypeError("attribute name must be str")
        is_dunder = text.startswith("__") and text.endswith("__")
        if text in _PROXY_HIDDEN_DUNDERS:
            raise AttributeError(
                f"module {module.__name__!r} has no attribute {str.__repr__(text)}", name=text
            )
        if text.startswith("_") and not is_dunder:
            raise SecurityViolation(_PRIVATE_ATTRIBUTE.format(text, module.__name__))
        value = getattr(module, text)
        if isinstance(value, types.ModuleType):
            return _proxy_of(value, object.__getattribute__(self, "_policy"))
        return value

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("modules are read-only for task code", name=name)

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("modules are read-only for task code", name=name)

    def __repr__(self) -> str:
        return repr(object.__getattribute__(self, "_module"))


def _proxy_of(module: types.ModuleType, policy: ImportPolicy) -> ModuleProxy:
    """A proxy of a module found on another one, if the allowlist admits it."""
    # The module's own name, not the path it was found on: ``uuid.os`` is ``os``.
    name = _exact_str(getattr(module, "__name__", None)) or "?"
    error = import_error(name, policy)
    if error is not None:
        raise SecurityViolation(error)
    return ModuleProxy(module, policy)


def _import_target(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], str]:
    """(args, kwargs with a plain-``str`` anchor, the absolute name to check)."""
    anchor: str | None = None
    if "package" in kwargs:  # import_module(name, package=...)
        anchor = _exact_str(kwargs["package"])
        if anchor is not None:
            kwargs = {**kwargs, "package": anchor}
    elif args and isinstance(args[0], str):  # import_module(name, package)
        anchor = _exact_str(args[0])
        args = (anchor, *args[1:])
    else:  # __import__(name, globals, locals, fromlist, level)
        level = kwargs["level"] if "level" in kwargs else args[3] if len(args) >= 4 else 0
        if isinstance(level, int) and int.__int__(level) > 0:
            importer = kwargs["globals"] if "globals" in kwargs else args[0] if args else None
            # An exact dict only: a subclass could answer our lookup and the
            # import machinery's differently.
            if type(importer) is dict:
                anchor = _exact_str(importer.get("__package__")) or None
            name = "." * int.__int__(level) + name
    if name.startswith(".") and anchor:
        # On failure the name stays dotted and is refused: fail closed.
        with contextlib.suppress(ImportError, ValueError):
            name = importlib.util.resolve_name(name, anchor)
    return args, kwargs, name


class SafeFormat(_Hardened):
    """The injected ``__sandbox_safe_format__`` (6.5): the runtime half of the
    format-string guard.

    The rewrite turns ``recv.format(*a, **k)`` into ``safe("format", recv, *a, **k)``;
    this finds the template the real method would use, scans it like a string
    literal, and only then calls the method. The template is: a ``str`` or
    ``UserString`` receiver itself; for unbound ``str.format`` the first argument,
    for unbound ``UserString.format`` that instance's data; for an unbound call on
    another class (``Formatter.format``) the second argument; for a bound call on
    another object (``Formatter().format``) the first; for ``get_field`` the field
    expression. A ``UserString`` whose data is not, in the end, a ``str`` cannot be
    checked and is refused (n8n lets it through unchecked).
    """

    __slots__ = ()
    _display_name = "format"

    def __call__(self, method: object, receiver: object, /, *args: Any, **kwargs: Any) -> Any:
        method_name = _exact_str(method)
        if method_name is None or method_name not in FORMAT_METHODS:
            # Only the rewrite calls this, always with a literal method name; any
            # other name would make this a getattr for whoever reached it.
            raise _no_attribute(str(method_name))
        template = _format_template(method_name, receiver, args)
        if template is not None:
            tokens = format_template_tokens(template)
            if tokens:
                raise SecurityViolation(string_pattern_message(tokens[0]))
        return getattr(receiver, method_name)(*args, **kwargs)


_UNCHECKABLE_TEMPLATE = "Format template could not be checked, because it is not a string."


def _is_user_string_type(cls: type) -> bool:
    # By name, not identity: a module imported after the purge gets a fresh copy of
    # ``collections`` whose UserString is another class object (n8n's isinstance
    # test misses it, and the template goes unchecked).
    return any(
        getattr(base, "__name__", None) == "UserString"
        and getattr(base, "__module__", None) == "collections"
        for base in cls.__mro__
    )


def _is_user_string(value: object) -> bool:
    return _is_user_string_type(type(value))


def _user_string_data(value: object) -> str:
    """The ``str`` under a (possibly nested) UserString, or a refusal."""
    for _ in range(100):
        if not _is_user_string(value):
            break
        value = value.data  # type: ignore[attr-defined]
    text = _exact_str(value)
    if text is None:
        raise SecurityViolation(_UNCHECKABLE_TEMPLATE)
    return text


def _format_template(method: str, receiver: object, args: tuple[Any, ...]) -> str | None:
    if method == "get_field":
        position = 1 if isinstance(receiver, type) else 0  # unbound: args[0] is the instance
        field = args[position] if len(args) > position else None
        if _is_user_string(field):
            return "{" + _user_string_data(field) + "}"
        text = _exact_str(field)
        return None if text is None else "{" + text + "}"
    if isinstance(receiver, str):
        return str.__str__(receiver)
    if _is_user_string(receiver):
        return _user_string_data(receiver)
    if isinstance(receiver, type):
        if issubclass(receiver, str):
            candidate = args[0] if args else None
        elif _is_user_string_type(receiver):
            return _user_string_data(args[0]) if args else None
        else:
            candidate = args[1] if len(args) >= 2 else None
    else:
        candidate = args[0] if args else None
    if _is_user_string(candidate):
        return _user_string_data(candidate)
    return _exact_str(candidate)  # anything else: the method itself rejects it


# -- print (5.7) --------------------------------------------------------------------


def format_print_arg(arg: object) -> str:
    """One ``print`` argument as n8n shows it in the browser console."""
    try:
        encoded = json.dumps(arg, default=str, ensure_ascii=False)
    except Exception:  # circular, non-str keys, or a failing __str__ / default
        return f"[Circular {type(arg).__name__}]"
    if isinstance(arg, str):
        return "".join(("'", arg, "'"))  # quoted, not escaped; join never calls arg's methods
    if arg is None or isinstance(arg, int | float):  # bool is an int
        return str(arg)
    return encoded


class PrintCapture(_Hardened):
    """The ``print`` task code sees (5.7): records, never writes.

    Each call records one entry, a list of formatted arguments; at most
    ``max_calls`` entries are kept, then :meth:`entries` ends with n8n's
    ``[Output truncated - N more print statements]``. The UTF-8 size of every
    formatted argument of every call (kept or not) is counted; past ``max_bytes``
    it calls ``on_overflow(total_bytes)`` (the agent ends the process there) and,
    should that return, raises :class:`OutputLimitExceeded`. ``sep``, ``end``,
    ``file`` and ``flush`` are accepted and ignored.
    """

    __slots__ = ("_dropped", "_entries", "_max_bytes", "_max_calls", "_on_overflow", "_total_bytes")
    _display_name = "print"
    _exposed = frozenset({"entries"})

    def __init__(
        self,
        *,
        max_calls: int = DEFAULT_MAX_PRINT_CALLS,
        max_bytes: int | None = None,
        on_overflow: Callable[[int], object] | None = None,
    ) -> None:
        for slot, value in (
            ("_entries", []),
            ("_dropped", 0),
            ("_total_bytes", 0),
            ("_max_calls", max_calls),
            ("_max_bytes", max_bytes),
            ("_on_overflow", on_overflow),
        ):
            object.__setattr__(self, slot, value)

    def __call__(self, *args: object, **kwargs: object) -> None:
        for key in kwargs:
            if key not in ("sep", "end", "file", "flush"):
                raise TypeError(f"{key!r} is an invalid keyword argument for print()")
        formatted = [format_print_arg(arg) for arg in args]
        state = object.__getattribute__
        total = state(self, "_total_bytes") + sum(
            len(text.encode("utf-8", "surrogatepass")) for text in formatted
        )
        object.__setattr__(self, "_total_bytes", total)
        max_bytes = state(self, "_max_bytes")
        if max_bytes is not None and total > max_bytes:
            on_overflow = state(self, "_on_overflow")
            if on_overflow is not None:
                on_overflow(total)
            raise OutputLimitExceeded(
                f"Task printed more than the output limit of {max_bytes} bytes"
            )
        entries = state(self, "_entries")
        if len(entries) < state(self, "_max_calls"):
            entries.append(formatted)
        else:
            object.__setattr__(self, "_dropped", state(self, "_dropped") + 1)

    def entries(self) -> list[list[str]]:
        """The recorded calls, plus n8n's truncation marker when calls were dropped."""
        kept = [list(entry) for entry in object.__getattribute__(self, "_entries")]
        dropped = object.__getattribute__(self, "_dropped")
        if dropped:
            kept.append([f"[Output truncated - {dropped} more print statements]"])
        return kept


# -- builtins (6.4) -----------------------------------------------------------------


class ReadOnlyBuiltins(dict[str, object]):
    """The ``__builtins__`` of task code: a read-only dict.

    A dict subclass, because CPython 3.11 reads ``__import__`` from a frame's
    builtins with C dict lookups: in the ``import`` statement (a non-dict mapping
    raises ``SystemError`` there; n8n's mapping-like object relies on 3.13) and in
    ``PyImport_Import``, which ``datetime.strptime``/``time.strptime`` and
    ``warnings.warn`` use (a ``mappingproxy`` broke those in n8n 2.17-2.19). Name
    lookups (``LOAD_GLOBAL``) take the generic path for a subclass, so a missing
    name raises ``KeyError`` and CPython reports ``NameError: name 'x' is not
    defined``. Like n8n's object, attribute access reads items too, except the
    read methods ``keys``/``values``/``items``/``get``. Every write is refused. The
    unbound ``dict`` methods could still write to it, but task code can only reach
    this object through names and attributes the analyzer rejects.
    """

    __slots__ = ()

    def __getattribute__(self, name: str) -> Any:
        if name in _MAPPING_METHODS:
            return object.__getattribute__(self, name)
        try:
            return dict.__getitem__(self, name)
        except KeyError:
            raise AttributeError(
                f"module 'builtins' has no attribute {str.__repr__(name)}", name=name
            ) from None

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("builtins are read-only")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("builtins are read-only", name=name)

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("builtins are read-only", name=name)

    def __repr__(self) -> str:
        return f"<read-only builtins: {dict.__len__(self)} names>"


# What attribute access on the builtins returns from the object itself; every other
# name is looked up among the builtins. ``__class__`` serves isinstance() checks
# against ABCs, which read it.
_MAPPING_METHODS = frozenset({"keys", "values", "items", "get", "__class__"})


def build_builtins(deny: Iterable[str], import_guard: Callable[..., Any]) -> ReadOnlyBuiltins:
    """A copy of the builtins minus ``deny``, with ``__import__`` replaced by the guard.

    With ``__build_class__`` denied (the default), ``class`` statements fail with
    ``NameError: __build_class__ not found``, as in n8n.
    """
    denied = set(deny) | _NEVER_EXPOSED_BUILTINS
    names = {key: value for key, value in vars(_builtins).items() if key not in denied}
    names["__import__"] = import_guard
    return ReadOnlyBuiltins(names)


# -- process hardening (6.4) --------------------------------------------------------

# The originals, taken once when this module loads (before any hardening), and
# unwrapped in case a guard is already installed: wrappers never stack.
_REAL_BUILTIN_IMPORT = _unwrap_import(_builtins.__import__)
_REAL_IMPORTLIB_IMPORT = _unwrap_import(importlib.__import__)
_REAL_IMPORT_MODULE = _unwrap_import(importlib.import_module)


def _is_kept(module: str, policy: ImportPolicy) -> bool:
    def listed(name: str, allowed: Iterable[str]) -> bool:
        return any(name == entry or name.startswith(entry + ".") for entry in allowed)

    if listed(module, _ALWAYS_KEPT_MODULES):
        return True
    top = module.split(".", 1)[0]
    allowed = policy.stdlib_allow if top in sys.stdlib_module_names else policy.external_allow
    return "*" in allowed or listed(module, allowed)


def purge_modules(policy: ImportPolicy) -> None:
    """Forget every loaded module task code may not import (and their submodules).

    Only the registry entries go: modules the agent already imported keep working
    through the references it holds, and a module imported afterwards is loaded
    afresh (through the guard, when task code asks for it). Objects reachable from
    kept modules stay reachable; that is why this is a speed bump.
    """
    for module in list(sys.modules):
        if not _is_kept(module, policy):
            sys.modules.pop(module, None)


def harden_process(policy: ImportPolicy) -> ImportGuard:
    """Purge ``sys.modules``, guard ``importlib``'s entry points; return the guard to
    install as the task's ``__import__``.

    Library code importing with a plain ``import`` statement uses the real
    ``builtins.__import__`` and is not checked (as in n8n); library code calling
    ``importlib.import_module`` is. Calling this twice installs fresh guards over
    the same originals.
    """
    purge_modules(policy)
    importlib.import_module = ImportGuard(policy, _REAL_IMPORT_MODULE)
    importlib.__import__ = ImportGuard(policy, _REAL_IMPORTLIB_IMPORT)
    return ImportGuard(policy, _REAL_BUILTIN_IMPORT, allow_runtime_helpers=True, proxy_modules=True)


def make_globals(
    *, builtins: object, print_fn: object, safe_format: object, **names: object
) -> dict[str, object]:
    """The globals of one execution: a fresh dict every time (per item in per-item
    mode), holding the builtins, the capturing print, the safe-format entry and the
    task's data (``_items``/``_query`` or ``_item``)."""
    reserved = {"__builtins__", "print", SAFE_FORMAT_NAME}.intersection(names)
    if reserved:
        raise TypeError(f"reserved global names: {', '.join(sorted(reserved))}")
    return {"__builtins__": builtins, "print": print_fn, SAFE_FORMAT_NAME: safe_format, **names}
