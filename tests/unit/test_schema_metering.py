"""Canary: the jsonschema internals that runner/broker_server/schemas.py patches.

The broker meters callers' schemas by wrapping every keyword function of
``Draft202012Validator.VALIDATORS`` and by replacing the validator class's ``evolve``
(rebuilt from its ``attrs`` fields) so that a subschema's ``$schema`` cannot switch to
an unmetered class; a reference to nowhere must surface as referencing's
``Unresolvable``. An upgrade of jsonschema, referencing or attrs that changes any of
this would leave the metering silently off (a tenant's schema could stall the event
loop again): each test here fails first, naming what changed.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import attrs
import jsonschema
import pytest
import referencing.exceptions

from runner.broker_server import schemas

VERSIONS = ", ".join(f"{name} {version(name)}" for name in ("jsonschema", "referencing", "attrs"))
CHANGED = f"{VERSIONS}: the internals runner/broker_server/schemas.py patches changed: "
DRAFT7 = "http://json-schema.org/draft-07/schema#"


def test_every_keyword_function_is_wrapped() -> None:
    original = jsonschema.Draft202012Validator.VALIDATORS
    metered = schemas._Metered.VALIDATORS
    assert isinstance(original, dict), CHANGED + "VALIDATORS is no longer a dict"
    assert set(metered) == set(original), CHANGED + "the keywords differ"
    unwrapped = [k for k, check in metered.items() if check.__name__ != "metered"]
    assert unwrapped == [], CHANGED + f"keywords not metered: {unwrapped}"


def test_a_validation_spends_one_check_per_keyword_function_call() -> None:
    # type 1, properties 1 + 1 property, required 1 + len("a") + 1, the property's type 1
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    budget = schemas._Budget(1000)
    assert schemas._schema_error(schema, {"a": 1}, "x", budget) is None
    assert 1000 - budget.remaining == 7, (
        CHANGED + "validating no longer calls each keyword's function from VALIDATORS "
        f"exactly once (spent {1000 - budget.remaining}, expected 7)"
    )


def test_descending_into_a_subschema_goes_through_our_evolve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    evolved: list[type] = []
    patched = schemas._Metered.evolve
    assert patched is schemas._evolve, CHANGED + "our evolve is not installed"

    def recording(self: Any, **changes: Any) -> Any:
        validator = patched(self, **changes)
        evolved.append(type(validator))
        return validator

    monkeypatch.setattr(schemas._Metered, "evolve", recording)
    schema = {"items": {"$schema": DRAFT7, "type": "integer"}}
    assert schemas._schema_error(schema, [1, 2], "x", schemas._Budget(1000)) is None
    assert evolved, CHANGED + "jsonschema no longer descends through validator.evolve"
    assert set(evolved) == {schemas._Metered}, (
        CHANGED + f"a subschema's $schema switched the validator class: {evolved}"
    )


def test_evolve_is_rebuilt_from_every_attrs_field() -> None:
    assert attrs.has(schemas._Metered), CHANGED + "the validator class is no longer attrs"
    names = {name for name, _ in schemas._METERED_FIELDS}
    assert {"schema", "_registry"} <= names, CHANGED + f"the fields are now {sorted(names)}"
    validator = schemas._Metered({"type": "integer"}, registry=schemas._NO_RETRIEVAL)
    again = validator.evolve(schema={"$schema": DRAFT7, "type": "string"})
    assert type(again) is schemas._Metered, CHANGED + f"evolve made a {type(again)}"
    for name, _ in schemas._METERED_FIELDS:
        if name != "schema":
            assert getattr(again, name) is getattr(validator, name), CHANGED + f"{name} lost"


def test_a_reference_to_nowhere_raises_referencings_unresolvable() -> None:
    validator = schemas._Metered(
        {"$ref": "https://example.invalid/x"}, registry=schemas._NO_RETRIEVAL
    )
    with pytest.raises(referencing.exceptions.Unresolvable):
        list(validator.iter_errors(1))


def test_the_meta_schema_check_is_metered_too() -> None:
    # check_schema validates the caller's schema against the 2020-12 meta-schema with
    # the metered class: a schema too large for the budget is refused, not checked.
    wide = {"properties": {f"p{n}": {"type": "integer"} for n in range(60_000)}}
    assert schemas.check_schema(wide, "inputSchema") == (
        f"inputSchema is too large to check (more than {schemas.VALIDATION_BUDGET} checks)"
    ), CHANGED + "the meta-schema check no longer spends the budget"
