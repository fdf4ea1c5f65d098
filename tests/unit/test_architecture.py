"""The import rules of docs/architecture.md, enforced by reading the imports of
``runner/**/*.py`` (and of the in-container agent) with :mod:`ast`.

Every rule has the id the document gives it (R1, R2, ...), and the document and this
file list the same ids. An import is one of three kinds, and each rule says which it
counts (the document's "counts" column):

- **top-level**: runs when the module is imported (module level, also under ``try``
  or ``if``);
- **function-level**: inside a ``def``, runs when the function is called (the command
  line defers what a command needs this way, so ``--help`` stays cheap);
- **type-only**: under ``if TYPE_CHECKING:``, never runs (annotations only).

``all`` counts the three; ``run time`` counts top-level and function-level (a
type-only import cannot make a cycle or load a layer, so the layering rules let it
through); ``top-level`` counts only what importing a module runs.

``from package import name`` counts as an import of the module ``package.name`` when
that module exists, else of ``package``; relative imports are resolved. The root
package ``runner`` (only ``__version__``) may be imported by anyone.

A failure names the rule and each offending import as ``path:line``.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pytest

from runner.settings import PROJECT_ROOT

RUNNER = PROJECT_ROOT / "runner"
AGENT = PROJECT_ROOT / "sandbox_image" / "agent"
DOC = PROJECT_ROOT / "docs" / "architecture.md"
ROOT_PACKAGE = "runner"


class Kind(StrEnum):
    TOP = "top-level"
    FUNCTION = "function-level"
    TYPE = "type-only"


ALL = frozenset(Kind)
RUN_TIME = frozenset({Kind.TOP, Kind.FUNCTION})


@dataclass(frozen=True)
class Import:
    importer: str
    path: Path
    line: int
    target: str
    names: tuple[str, ...]
    kind: Kind

    def __str__(self) -> str:
        where = self.path.relative_to(PROJECT_ROOT)
        what = f"{self.target} ({', '.join(self.names)})" if self.names else self.target
        return f"{where}:{self.line}: {self.kind} import of {what}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def read_imports(path: Path, root: Path, known: set[str]) -> list[Import]:
    """Every import statement of one file, resolved, with its kind."""
    importer = module_name(path, root)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    found: list[Import] = []

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def walk(node: ast.AST, kind: Kind) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child.test):
                for inner in child.body:
                    visit(inner, Kind.TYPE)
                for inner in child.orelse:
                    visit(inner, kind)
            else:
                visit(child, kind)

    def visit(node: ast.AST, kind: Kind) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(importer, path, node.lineno, alias.name, (), kind))
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    found.append(Import(importer, path, node.lineno, submodule, (), kind))
                else:
                    found.append(Import(importer, path, node.lineno, source, (alias.name,), kind))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            walk(node, Kind.TYPE if kind is Kind.TYPE else Kind.FUNCTION)
        else:
            walk(node, kind)

    walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), Kind.TOP)
    return found


def python_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


RUNNER_FILES = python_files(RUNNER)
MODULES = {module_name(path, PROJECT_ROOT): path for path in RUNNER_FILES}
IMPORTS = [
    found for path in RUNNER_FILES for found in read_imports(path, PROJECT_ROOT, set(MODULES))
]


def within(name: str, patterns: Iterable[str]) -> bool:
    """Is ``name`` one of ``patterns`` or inside one of them (a package's modules)?"""
    return any(name == pattern or name.startswith(pattern + ".") for pattern in patterns)


@dataclass(frozen=True)
class Rule:
    """``importers`` (but ``exempt``), counting the imports of ``kinds``, import none of
    ``forbidden`` (but ``allowed``); with ``only`` set, of runner's modules only those
    (and ``names_from``: these names of that module); with ``stdlib_only``, nothing
    outside the standard library but runner's modules."""

    id: str
    importers: tuple[str, ...]
    kinds: frozenset[Kind] = RUN_TIME
    forbidden: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    names_from: tuple[tuple[str, tuple[str, ...]], ...] = ()
    stdlib_only: bool = False
    exempt: tuple[str, ...] = ()

    def breaks(self, found: Import) -> bool:
        if found.kind not in self.kinds or not within(found.importer, self.importers):
            return False
        if within(found.importer, self.exempt) or found.target == ROOT_PACKAGE:
            return False
        if within(found.target, self.forbidden) and not within(found.target, self.allowed):
            return True
        if not within(found.target, (ROOT_PACKAGE,)):
            return self.stdlib_only and found.target.partition(".")[0] not in STDLIB
        if self.only is None or within(found.target, self.only):
            return False
        return not any(
            found.target == module and set(found.names) <= set(names)
            for module, names in self.names_from
        )

    def label(self) -> str:
        return f"{self.id}:{','.join(self.importers)}"


STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}
# The docker SDK and its HTTP transport.
DOCKER = ("docker", "requests")
# The event loop and every library that does network I/O.
IO = ("asyncio", "websockets", "fastapi", "starlette", "uvicorn", "httpx", *DOCKER)
# Docker's part of the sandbox: the backend, its faults, the image it builds.
DOCKER_BACKEND = ("runner.sandbox.docker", "runner.sandbox.docker_errors", "runner.sandbox.image")
OCI_BACKEND = ("runner.sandbox.oci",)
BROKER_IO = (
    "runner.broker_server.app",
    "runner.broker_server.cluster",
    "runner.broker_server.driver",
    "runner.broker_server.edge",
    "runner.broker_server.redis_store",
    "runner.broker_server.server",
    "runner.broker_server.sqlite_store",
)
BROKER_SANS_IO = (
    "runner.broker_server.core",
    "runner.broker_server.deadlines",
    "runner.broker_server.ledger",
    "runner.broker_server.retry",
    "runner.broker_server.runners",
    "runner.broker_server.schemas",
    "runner.broker_server.shared",
    "runner.broker_server.store",
    "runner.broker_server.submission",
    "runner.broker_server.tasks",
    "runner.broker_server.tenants",
    "runner.broker_server.tokens",
)
CLI_COMMANDS = (
    "runner.cli.exec",
    "runner.cli.image",
    "runner.cli.policy",
    "runner.cli.selfcheck",
    "runner.cli.service",
)
# The policy package's modules, each importing only (some of) those before it.
POLICY_ORDER = {
    "runner.policy.model": (),
    "runner.policy.seccomp": ("runner.policy.model",),
    "runner.policy.tenant": ("runner.policy.model",),
    "runner.policy.bundle": (
        "runner.policy.model",
        "runner.policy.seccomp",
        "runner.policy.tenant",
    ),
    "runner.policy.docker_default": ("runner.policy.model", "runner.policy.seccomp"),
    "runner.policy.lint": (
        "runner.policy.model",
        "runner.policy.seccomp",
        "runner.policy.tenant",
        "runner.policy.bundle",
        "runner.policy.docker_default",
    ),
    "runner.policy.explain": (
        "runner.policy.model",
        "runner.policy.seccomp",
        "runner.policy.tenant",
        "runner.policy.bundle",
        "runner.policy.docker_default",
    ),
    "runner.policy.diff": (
        "runner.policy.model",
        "runner.policy.seccomp",
        "runner.policy.tenant",
        "runner.policy.bundle",
        "runner.policy.docker_default",
        "runner.policy.explain",
    ),
    "runner.policy.effective": (
        "runner.policy.model",
        "runner.policy.seccomp",
        "runner.policy.tenant",
        "runner.policy.bundle",
        "runner.policy.lint",
        "runner.settings",
    ),
}
POLICY_OUTSIDE = ("runner.analyzer", "runner.errors", "runner.sandbox.base")

RULES = [
    # -- layers: which of runner's modules each may import --
    Rule("R1", ("runner.errors", "runner.logs"), ALL, only=(), stdlib_only=True),
    Rule(
        "R2",
        ("runner.analyzer",),
        ALL,
        forbidden=("pydantic", *DOCKER),
        only=("runner.analyzer", "runner.workers"),
    ),
    Rule(
        "R2",
        ("runner.analyzer.cache", "runner.analyzer.core", "runner.analyzer.worker"),
        ALL,
        forbidden=("asyncio",),
    ),
    Rule("R3", ("runner.sandbox.base",), ALL, forbidden=("asyncio", "pydantic", *DOCKER), only=()),
    Rule("R4", ("runner.settings",), only=("runner.analyzer", "runner.sandbox.base")),
    Rule(
        "R5",
        ("runner.protocol",),
        ALL,
        forbidden=IO,
        only=("runner.protocol", "runner.errors", "runner.sandbox.base"),
    ),
    Rule(
        "R6",
        ("runner.policy",),
        ALL,
        forbidden=DOCKER,
        only=("runner.policy", *POLICY_OUTSIDE, "runner.settings"),
    ),
    *(
        Rule(
            "R7",
            (module,),
            only=(*POLICY_OUTSIDE, *before),
            names_from=(("runner.settings", ("DATA_ROOT",)),),
        )
        if module == "runner.policy.seccomp"
        else Rule("R7", (module,), only=(*POLICY_OUTSIDE, *before))
        for module, before in POLICY_ORDER.items()
    ),
    Rule("R8", ("runner.sandbox",), only=("runner.sandbox", "runner.errors", "runner.settings")),
    Rule(
        "R9",
        ("runner.sandbox",),
        ALL,
        forbidden=(*DOCKER, *DOCKER_BACKEND, *OCI_BACKEND),
        exempt=(*DOCKER_BACKEND, *OCI_BACKEND),
    ),
    Rule("R10", DOCKER_BACKEND, ALL, forbidden=OCI_BACKEND),
    Rule("R10", OCI_BACKEND, ALL, forbidden=("runner.sandbox.docker", "runner.sandbox.image")),
    Rule(
        "R11",
        (
            "runner.sandbox.base",
            "runner.sandbox.envelope",
            "runner.sandbox.interpret",
            "runner.sandbox.isolation",
            "runner.sandbox.labels",
            "runner.sandbox.spec",
            "runner.sandbox.stream",
        ),
        ALL,
        forbidden=("asyncio",),
    ),
    Rule(
        "R12",
        ("runner.pipeline",),
        ALL,
        forbidden=(*DOCKER, "runner.protocol"),
        only=("runner.analyzer", "runner.errors", "runner.logs", "runner.sandbox.base"),
    ),
    Rule(
        "R13",
        ("runner.selfcheck",),
        ALL,
        forbidden=DOCKER,
        only=(
            "runner.analyzer",
            "runner.errors",
            "runner.pipeline",
            "runner.policy",
            "runner.sandbox.base",
            "runner.selfcheck",
        ),
    ),
    Rule("R14", ("runner.metrics",), ALL, forbidden=("asyncio", *DOCKER), only=()),
    Rule("R15", ("runner.broker",), only=("runner.errors", "runner.protocol")),
    Rule(
        "R16",
        ("runner.service",),
        ALL,
        forbidden=DOCKER,
        only=(
            "runner.broker",
            "runner.errors",
            "runner.logs",
            "runner.metrics",
            "runner.pipeline",
            "runner.protocol",
            "runner.sandbox.base",
            "runner.settings",
        ),
    ),
    Rule(
        "R17",
        ("runner.broker_server",),
        ALL,
        forbidden=DOCKER,
        only=(
            "runner.broker_server",
            "runner.errors",
            "runner.metrics",
            "runner.pipeline",
            "runner.policy",
            "runner.protocol",
            "runner.sandbox.base",
            "runner.settings",
            "runner.workers",
        ),
    ),
    Rule("R18", BROKER_SANS_IO, ALL, forbidden=(*IO, *BROKER_IO)),
    Rule(
        "R19",
        ("runner.runner_image",),
        only=(
            "runner.errors",
            "runner.sandbox.bundle",
            "runner.sandbox.docker_errors",
            "runner.sandbox.image",
        ),
    ),
    # -- the command line --
    Rule(
        "R20",
        CLI_COMMANDS,
        ALL,
        forbidden=("runner.cli",),
        allowed=("runner.cli.support", "runner.cli.wiring"),
    ),
    Rule("R20", ("runner.cli.support", "runner.cli.wiring"), ALL, forbidden=("runner.cli",)),
    Rule(
        "R21",
        ("runner",),
        ALL,
        forbidden=("runner.cli",),
        exempt=("runner.__main__", "runner.testing", "runner.cli"),
    ),
    Rule("R22", ("runner",), ALL, forbidden=("runner.testing",), exempt=("runner.testing",)),
    Rule(
        "R23",
        ("runner",),
        ALL,
        forbidden=("runner.sandbox.docker", "runner.sandbox.container", *OCI_BACKEND),
        exempt=("runner.sandbox", "runner.cli"),
    ),
    # -- third-party libraries, each confined to the modules whose job it is --
    Rule(
        "R24",
        ("runner",),
        ALL,
        forbidden=DOCKER,
        exempt=(
            *DOCKER_BACKEND,
            "runner.sandbox.oci.rootfs",
            "runner.runner_image",
            "runner.testing",
            "runner.cli",
        ),
    ),
    Rule("R25", ("runner",), ALL, forbidden=("websockets",), exempt=("runner.broker",)),
    Rule(
        "R26",
        ("runner",),
        ALL,
        forbidden=("fastapi", "starlette", "uvicorn"),
        exempt=(
            "runner.broker_server.app",
            "runner.broker_server.edge",
            "runner.broker_server.server",
        ),
    ),
    Rule(
        "R27",
        ("runner",),
        ALL,
        forbidden=("jsonschema", "referencing", "attrs"),
        exempt=("runner.broker_server.schemas",),
    ),
    Rule("R28", ("runner",), ALL, forbidden=("prometheus_client",), exempt=("runner.metrics",)),
    Rule("R29", ("runner",), ALL, forbidden=("click",), exempt=("runner.cli",)),
    Rule("R30", ("runner",), ALL, forbidden=("testcontainers",), exempt=("runner.testing",)),
    Rule("R31", ("runner",), ALL, forbidden=("pydantic_settings",), exempt=("runner.settings",)),
    Rule(
        "R32",
        ("runner",),
        ALL,
        forbidden=("tenacity",),
        exempt=("runner.broker", "runner.sandbox.container"),
    ),
    Rule("R33", ("runner",), ALL, forbidden=("httpx",), exempt=("runner.broker", "runner.testing")),
    Rule(
        "R37",
        ("runner",),
        ALL,
        forbidden=("sqlite3",),
        exempt=("runner.broker_server.sqlite_store",),
    ),
    Rule(
        "R39",
        ("runner",),
        ALL,
        forbidden=("redis",),
        exempt=("runner.broker_server.redis_store",),
    ),
    Rule("R38", ("runner.workers",), ALL, only=("runner.workers",), stdlib_only=True),
    Rule("R38", ("runner.workers.child",), ALL, forbidden=("asyncio",)),
]
# Rules checked by a test of their own below (not a list of forbidden imports).
PACKAGES_THROUGH_INIT = "R34"
AGENT_STDLIB = "R35"
CLI_LOADS_LIGHT = "R36"
SPECIAL = (PACKAGES_THROUGH_INIT, AGENT_STDLIB, CLI_LOADS_LIGHT)


@pytest.mark.parametrize("rule", RULES, ids=Rule.label)
def test_the_import_rule_holds(rule: Rule) -> None:
    broken = [str(found) for found in IMPORTS if rule.breaks(found)]
    assert not broken, f"{rule.id} (docs/architecture.md) is broken by:\n" + "\n".join(broken)


def packages() -> set[str]:
    return {module_name(path, PROJECT_ROOT) for path in RUNNER_FILES if path.name == "__init__.py"}


def test_modules_import_their_siblings_directly_never_through_the_package() -> None:
    """R34: inside a package, ``from runner.policy.bundle import X``, never ``from
    runner.policy import X`` (the package's ``__init__`` only re-exports; going through
    it makes cycles and hides which module a name comes from). All kinds."""
    broken = [
        str(found)
        for found in IMPORTS
        if found.target in packages()
        and found.target != ROOT_PACKAGE
        and within(found.importer, (found.target,))
        and found.importer != found.target
    ]
    assert not broken, f"{PACKAGES_THROUGH_INIT} is broken by:\n" + "\n".join(broken)


def test_the_agent_imports_the_standard_library_and_itself_only() -> None:
    """R35: the in-container agent runs where nothing is installed: the standard library
    and its own package only (never ``runner``), and so does the analyzer core that the
    image build copies in as ``sandbox_agent/analyzer_core.py``. All kinds."""
    # A relative import inside the agent resolves to its own package, sandbox_agent.
    allowed = STDLIB | {"sandbox_agent"}
    agent_files = python_files(AGENT)
    assert agent_files, f"no agent under {AGENT}"
    found = [f for path in agent_files for f in read_imports(path, AGENT, set())]
    core = RUNNER / "analyzer" / "core.py"
    found += [f for f in IMPORTS if f.path == core]
    broken = [str(f) for f in found if f.target.partition(".")[0] not in allowed]
    assert not broken, f"{AGENT_STDLIB} is broken by:\n" + "\n".join(broken)


# What ``import runner.cli`` must not load: every command, ``--help``, ``--version`` and
# the runner image's HEALTHCHECK (``sandbox-runner healthcheck``, every 15 s) start here.
HEAVY = (
    *DOCKER,
    "fastapi",
    "starlette",
    "uvicorn",
    "websockets",
    "httpx",
    "testcontainers",
    "jsonschema",
    "prometheus_client",
    "tenacity",
)


def loaded_at_import(start: str) -> dict[str, tuple[Import, ...]]:
    """What importing ``start`` runs: the closure of top-level imports over runner's
    modules (a module's packages' ``__init__`` included), each name with the chain of
    imports that first reached it; third-party names are recorded, not followed."""
    by_importer: dict[str, list[Import]] = {}
    for found in IMPORTS:
        if found.kind is Kind.TOP:
            by_importer.setdefault(found.importer, []).append(found)
    reached: dict[str, tuple[Import, ...]] = {}
    queue: list[tuple[str, tuple[Import, ...]]] = [(start, ())]
    while queue:
        name, chain = queue.pop(0)
        if name in reached:
            continue
        reached[name] = chain
        if name not in MODULES:
            continue
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        queue.extend((parent, chain) for parent in parents if parent in MODULES)
        queue.extend((found.target, (*chain, found)) for found in by_importer.get(name, []))
    return reached


def test_the_command_line_loads_no_heavy_library_at_import() -> None:
    """R36: the command modules import what a command runs inside its function, so
    ``import runner.cli`` reaches none of :data:`HEAVY`. Top-level imports only: this
    rule is about what importing runs, and function-level imports are how it holds."""
    broken: dict[str, str] = {}
    for name, chain in loaded_at_import("runner.cli").items():
        library = name.partition(".")[0]
        if within(name, HEAVY) and library not in broken:
            steps = [f"{f.path.relative_to(PROJECT_ROOT)}:{f.line}" for f in chain]
            broken[library] = f"{library}: " + " -> ".join(steps)
    assert not broken, f"{CLI_LOADS_LIGHT} is broken: importing runner.cli loads\n" + "\n".join(
        broken.values()
    )


def test_the_rules_see_the_imports_they_are_about() -> None:
    """The reader itself: a lazy import counts as function-level, a TYPE_CHECKING one as
    type-only, ``from package import module`` as the module (else each rule above could
    pass by seeing nothing)."""
    wiring = [f for f in IMPORTS if f.importer == "runner.cli.wiring"]
    assert any(f.target == "docker" and f.kind is Kind.TYPE for f in wiring)
    image = [f for f in IMPORTS if f.importer == "runner.cli.image"]
    assert any(f.target == "runner.sandbox.docker" and f.kind is Kind.FUNCTION for f in image)
    runtime = [f for f in IMPORTS if f.importer == "runner.sandbox.oci.runtime"]
    assert any(f.target == "runner.sandbox.oci.cgroups" and f.kind is Kind.TOP for f in runtime)
    assert "docker" in loaded_at_import("runner.sandbox.docker")
    assert len(IMPORTS) > 500


# -- the document and this file agree --

RULE_ROW = re.compile(r"^\|\s*(R\d+)\s*\|", re.MULTILINE)
MODULE_PATH = re.compile(r"`(runner/[\w/]*?\w+\.py)`")


def documented_rules() -> list[str]:
    return RULE_ROW.findall(DOC.read_text(encoding="utf-8"))


def test_the_document_states_each_rule_this_file_enforces_and_no_other() -> None:
    documented = documented_rules()
    assert len(documented) == len(set(documented)), "a rule id twice in docs/architecture.md"
    enforced = {rule.id for rule in RULES} | set(SPECIAL)
    unstated, unenforced = enforced - set(documented), set(documented) - enforced
    assert not unstated, f"enforced here, not stated in docs/architecture.md: {unstated}"
    assert not unenforced, f"stated in docs/architecture.md, not enforced here: {unenforced}"


def test_the_package_map_names_every_module_of_runner_and_no_stale_one() -> None:
    named = set(MODULE_PATH.findall(DOC.read_text(encoding="utf-8")))
    modules = {
        str(path.relative_to(PROJECT_ROOT)) for path in RUNNER_FILES if path.name != "__init__.py"
    }
    missing = sorted(modules - named)
    assert not missing, f"docs/architecture.md's package map lacks {missing}"
    stale = sorted(path for path in named if not (PROJECT_ROOT / path).is_file())
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"
    text = DOC.read_text(encoding="utf-8")
    for package in sorted(packages() - {ROOT_PACKAGE}):
        folder = package.replace(".", "/") + "/"
        assert f"`{folder}`" in text, f"docs/architecture.md's package map lacks {folder}"
