"""Callers' JSON Schemas (``inputSchema``, ``outputSchema``): refused, checked, metered.

Owns: which schemas the broker refuses up front (:func:`check_schema`, a 422), applying
a schema to a task's items (:func:`validate_input`) and to its result
(:func:`validate_result`), and the metering that keeps one tenant's schema from
stalling the broker's event loop for everyone. Three guards:

* keywords whose cost is not linear in the data are refused up front
  (:data:`REFUSED_KEYWORDS`, a 422 naming where);
* data nested deeper than :data:`MAX_VALIDATED_DEPTH` is not validated at all;
* every keyword check is metered: one validation (all of a task's items together, or
  one result) may spend at most :func:`budget_for` checks, so nested ``anyOf``
  (exponential in the depth), big ``enum`` lists and the like end in a clear refusal.

No reference is ever fetched: only the caller's own document and the bundled
meta-schemas resolve (jsonschema's default registry would ``urlopen`` any URL).

The metering is the cheap, deterministic refusal; the wall behind it is a worker
process with its own CPU-time and memory limit (:mod:`runner.broker_server.schema_pool`,
which runs these same functions in ``runner.broker_server.schema_worker``). On the
event loop itself only a *trial* runs (:func:`trial_schema`, :func:`trial_input`,
:func:`trial_result`): tiny schemas and data (:data:`INLINE_MAX_VALUES` JSON values),
under a budget of :data:`INLINE_CHECKS` checks, a few milliseconds at most. A trial
that runs out answers :data:`DEFERRED` (never a refusal): the same check is then made
in a worker with the full budget, so every answer is what the full check gives.

The metering reaches into jsonschema: it wraps every function of
``Draft202012Validator.VALIDATORS`` and replaces the validator class's ``evolve``
(rebuilt from its ``attrs`` fields), so a subschema's ``$schema`` cannot switch to an
unmetered class. ``pyproject.toml`` bounds jsonschema, referencing and attrs for that
reason, and tests/unit/test_schema_metering.py fails loudly when an upgrade changes
what is patched here. Every other module of the broker reaches jsonschema only
through this one. Imports nothing of the project.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import attrs
import jsonschema
import referencing
import referencing.exceptions

log = logging.getLogger(__name__)

MAX_VALIDATED_DEPTH = 64
VALIDATION_BUDGET = 100_000  # keyword checks, about a second of event loop at most

_REGEX_REASON = (
    "regular-expression keywords (pattern, patternProperties) are not supported, because "
    "a backtracking pattern could stall the broker for every tenant"
)
# keyword -> why a caller schema may not use it.
REFUSED_KEYWORDS: dict[str, str] = {
    # Python's backtracking engine: one pattern like ``^(a+)+$`` stalls the loop for
    # seconds (jsonschema also matches patternProperties inside additionalProperties
    # and unevaluatedProperties).
    "pattern": _REGEX_REASON,
    "patternProperties": _REGEX_REASON,
    # jsonschema compares unsortable items (objects, mixed types) pairwise: 4000 small
    # objects (51 KB) took 18 s.
    "uniqueItems": (
        "uniqueItems is not supported, because checking it takes time quadratic in the "
        "array's length and could stall the broker for every tenant"
    ),
    # jsonschema finds evaluated keys with an unmetered walk through $ref and
    # dependentSchemas: 2 KB of schema took 28 s (doubling per nesting level).
    "unevaluatedProperties": (
        "unevaluatedProperties is not supported, because checking it can take time "
        "exponential in the schema's nesting; use additionalProperties"
    ),
    "unevaluatedItems": (
        "unevaluatedItems is not supported, because checking it can take time "
        "exponential in the schema's nesting; use items"
    ),
}
# Keywords refused only with these values (``uniqueItems: false`` asks for nothing).
_HARMLESS_VALUES: dict[str, Any] = {"uniqueItems": False}
# Messages of errors name the failing value: a caller's 5 MB string stays out of them.
MAX_ERROR_MESSAGE_CHARS = 500
# Budget per item (input) or per element of a list result, on top of the base: ordinary
# schemas cost about ten checks per row, so large payloads are not refused for size alone.
BUDGET_PER_ROW = 50
REGEX_KEYWORDS = ("pattern", "patternProperties")

# Keywords whose value maps names to schemas (the names are data, not keywords).
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "dependentSchemas"})
# Keywords whose value is data (never a schema).
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "required"})


#: The inline trial's bounds, measured on the reference host (docs/operations.md,
#: "Callers' schemas"): a typical object schema costs ~20 checks per item and its
#: meta-schema check ~700 (0.6 ms); 1,000 checks of the costliest kind (``$ref`` at
#: every level) take ~5 ms, 9 ms at worst. Values: the data (and the schema) walked
#: before any check, and the unmetered parts of a check (compiling the schema,
#: crawling it for references, sorting errors) grow with them.
INLINE_CHECKS = 1_000
INLINE_MAX_VALUES = 1_000
#: A result's schema is kept as JSON text: longer text is not even decoded inline.
INLINE_MAX_SCHEMA_CHARS = 16 * 1024


class _OverBudget(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Deferred:
    """A check an inline trial could not settle within its bounds: a worker's to make."""


DEFERRED = Deferred()


@dataclass
class _Budget:
    remaining: int
    trial: bool = False  # over it: DEFERRED, not a refusal

    def spend(self, cost: int) -> None:
        self.remaining -= cost
        if self.remaining < 0:
            raise _OverBudget


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "schema_budget", default=None
)
_SORTABLE = (str, int, float)


def _cost(keyword: str, value: Any, instance: Any) -> int:
    """What one keyword check costs, in budget units (most are 1)."""
    if keyword == "uniqueItems" and value is True and isinstance(instance, list):
        # jsonschema sorts items of one primitive kind; anything else is compared pairwise.
        kinds = {str if isinstance(i, str) else float for i in instance if type(i) in _SORTABLE}
        if len(kinds) <= 1 and all(type(i) in _SORTABLE for i in instance):
            return 1 + len(instance)
        return 1 + len(instance) * len(instance) // 2
    if keyword == "dependentRequired" and isinstance(value, dict):
        return 1 + sum(len(names) if isinstance(names, list) else 1 for names in value.values())
    if keyword in ("enum", "required") and isinstance(value, list):
        return 1 + sum(_shallow_size(entry) for entry in value)
    if keyword == "const":
        return 1 + _shallow_size(value)
    if keyword == "properties" and isinstance(value, dict):
        return 1 + len(value)
    return 1


def _shallow_size(value: Any) -> int:
    """A cheap measure of what comparing against ``value`` costs (containers: their length)."""
    return 1 + len(value) if isinstance(value, list | dict | str) else 1


def _metered(keyword: str, check: Callable[..., Any]) -> Callable[..., Any]:
    def metered(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.spend(_cost(keyword, value, instance))
        return check(validator, value, instance, schema)

    return metered


_Metered: Any = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator,
    validators={
        keyword: _metered(keyword, check)
        for keyword, check in jsonschema.Draft202012Validator.VALIDATORS.items()
    },
)
_METERED_FIELDS = [(f.name, f.alias) for f in attrs.fields(_Metered) if f.init]


def _evolve(self: Any, **changes: Any) -> Any:
    # jsonschema's own evolve switches to another (unmetered) validator class when a
    # subschema names a ``$schema``; ours stays metered (and 2020-12, as checked).
    changes.setdefault("schema", self.schema)
    for name, alias in _METERED_FIELDS:
        changes.setdefault(alias, getattr(self, name))
    return _Metered(**changes)


_Metered.evolve = _evolve
# Only the bundled meta-schemas (jsonschema always adds them) and the caller's document.
_NO_RETRIEVAL: referencing.Registry[Any] = referencing.Registry()


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether lists/objects nest more than ``limit`` levels (iterative: any depth)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _values_within(value: Any, limit: int) -> bool:
    """Whether ``value`` holds at most ``limit`` JSON values (stops counting past it)."""
    stack = [value]
    count = 0
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            return False
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return True


def _schema_error(
    schema: dict[str, Any] | None,
    value: Any,
    root: str,
    budget: _Budget | None = None,
    validator: Any = None,
) -> str | Deferred | None:
    """The first JSON Schema violation as ``path: message``, or None.

    Never raises: whatever the caller's schema does (a ``$ref`` cycle that consumes
    no data, too much work, a reference to nowhere) ends in a message.
    """
    if schema is None:
        return None
    if _deeper_than(value, MAX_VALIDATED_DEPTH):
        return (
            f"{root}: nests deeper than {MAX_VALIDATED_DEPTH} levels, "
            "too deep to validate against the schema"
        )
    budget = budget if budget is not None else _Budget(VALIDATION_BUDGET)
    token = _BUDGET.set(budget)
    try:
        # The first few errors are enough to name one (all of them could be millions).
        errors = sorted(
            itertools.islice(
                (validator or _Metered(schema, registry=_NO_RETRIEVAL)).iter_errors(value), 100
            ),
            key=lambda e: list(e.path),
        )
    except referencing.exceptions.Unresolvable as exc:
        # A ``$ref`` to nowhere (or to a URL: nothing is ever fetched).
        return f"{root}: the schema's reference {exc.ref!r} cannot be resolved"
    except _OverBudget:
        if budget.trial:
            return DEFERRED
        return (
            f"{root}: validating against the schema takes more checks than the broker "
            "allows; simplify the schema or send less data"
        )
    except RecursionError:
        if budget.trial:
            return DEFERRED  # how deep the caller's own stack is must not decide it
        return (
            f"{root}: the schema recurses too deeply to validate "
            "(a $ref cycle that consumes no data?)"
        )
    except MemoryError:
        raise  # a worker's limit: the worker answers it (inline, the trial is tiny)
    except Exception as exc:  # a caller's schema must not raise out of the broker
        log.warning("validating %s against a caller's schema failed", root, exc_info=True)
        return f"{root}: the schema cannot be applied ({type(exc).__name__})"
    finally:
        _BUDGET.reset(token)
    if not errors:
        return None
    first = errors[0]
    path = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.path)
    message = first.message
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS] + "... (shortened)"
    return f"{path}: {message}"


def budget_for(rows: int) -> int:
    """The check budget of one validation of ``rows`` items (or result elements)."""
    return VALIDATION_BUDGET + BUDGET_PER_ROW * rows


def _settled(verdict: str | Deferred | None) -> str | None:
    if isinstance(verdict, Deferred):  # only a trial's budget defers
        raise AssertionError("a full check deferred")
    return verdict


def _items_error(
    schema: dict[str, Any], items: list[Any], budget: _Budget
) -> str | Deferred | None:
    validator = _Metered(schema, registry=_NO_RETRIEVAL)  # one for all the items
    for index, item in enumerate(items):
        error = _schema_error(
            schema,
            # n8n items' json, or plain objects (the API wraps them as {"json": ...})
            item["json"] if isinstance(item, dict) and "json" in item else item,
            f"items[{index}].json",
            budget,
            validator,
        )
        if error is not None:
            return error
    return None


def validate_input(schema: dict[str, Any] | None, items: list[Any]) -> str | None:
    """Every item's ``json`` against ``inputSchema``; the first failure with its path.

    All items share one budget of checks (:func:`budget_for`: a base plus some per item).
    """
    if schema is None:
        return None
    return _settled(_items_error(schema, items, _Budget(budget_for(len(items)))))


def validate_result(schema: dict[str, Any] | None, result: Any) -> str | None:
    """A task's result against ``outputSchema``: the first failure with its path.

    The budget grows with the elements of a list result (:func:`budget_for`).
    """
    rows = len(result) if isinstance(result, list) else 1
    return _settled(_schema_error(schema, result, "result", _Budget(budget_for(rows))))


def trial_input(schema: dict[str, Any] | None, items: list[Any]) -> str | Deferred | None:
    """:func:`validate_input` if it is tiny and settles within :data:`INLINE_CHECKS`;
    else :data:`DEFERRED`."""
    if schema is None:
        return None
    if not _values_within(items, INLINE_MAX_VALUES) or not _values_within(
        schema, INLINE_MAX_VALUES
    ):
        return DEFERRED
    return _items_error(schema, items, _Budget(INLINE_CHECKS, trial=True))


def trial_result(schema_json: str | None, result: Any) -> str | Deferred | None:
    """:func:`validate_result` of a schema kept as JSON text, if it is tiny and settles
    within :data:`INLINE_CHECKS`; else :data:`DEFERRED`."""
    if schema_json is None:
        return None
    if len(schema_json) > INLINE_MAX_SCHEMA_CHARS or not _values_within(result, INLINE_MAX_VALUES):
        return DEFERRED
    budget = _Budget(INLINE_CHECKS, trial=True)
    return _schema_error(json.loads(schema_json), result, "result", budget)


def refused_keyword_in(schema: Any) -> tuple[str, str] | None:
    """Where the schema first uses a keyword of :data:`REFUSED_KEYWORDS`, and why."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, where = stack.pop()
        found: list[tuple[Any, str]] = []
        if isinstance(node, list):
            found = [(sub, f"{where}[{index}]") for index, sub in enumerate(node)]
        elif isinstance(node, dict):
            for keyword, value in node.items():
                path = f"{where}.{keyword}" if where else keyword
                if keyword in REFUSED_KEYWORDS and (
                    keyword not in _HARMLESS_VALUES or value is not _HARMLESS_VALUES[keyword]
                ):
                    return path, REFUSED_KEYWORDS[keyword]
                if keyword in _DATA_KEYWORDS:
                    continue
                if keyword in _SCHEMA_MAPS and isinstance(value, dict):
                    found.extend((sub, f"{path}.{key}") for key, sub in value.items())
                else:
                    found.append((value, path))
        stack.extend(reversed(found))  # depth first, in document order
    return None


def check_schema(schema: dict[str, Any] | None, name: str) -> str | None:
    """Why a caller's schema is refused (a 422), or None. Never raises."""
    return _settled(_schema_problem(schema, name, _Budget(VALIDATION_BUDGET)))


def trial_schema(schema: dict[str, Any] | None, name: str) -> str | Deferred | None:
    """:func:`check_schema` if the schema is tiny and its check settles within
    :data:`INLINE_CHECKS`; else :data:`DEFERRED`."""
    if schema is not None and not _values_within(schema, INLINE_MAX_VALUES):
        return DEFERRED
    return _schema_problem(schema, name, _Budget(INLINE_CHECKS, trial=True))


def _schema_problem(
    schema: dict[str, Any] | None, name: str, budget: _Budget
) -> str | Deferred | None:
    if schema is None:
        return None
    found = refused_keyword_in(schema)
    if found is not None:
        return f"{name} uses {found[0]}: {found[1]}"
    meta = _Metered(
        jsonschema.Draft202012Validator.META_SCHEMA,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    token = _BUDGET.set(budget)
    try:
        error = next(meta.iter_errors(schema), None)
    except _OverBudget:
        if budget.trial:
            return DEFERRED
        return f"{name} is too large to check (more than {VALIDATION_BUDGET} checks)"
    except RecursionError:
        if budget.trial:
            return DEFERRED  # how deep the caller's own stack is must not decide it
        return f"{name} nests too deeply to check"
    finally:
        _BUDGET.reset(token)
    if error is not None:
        return f"{name} is not a valid JSON Schema: {error.message}"
    return None
