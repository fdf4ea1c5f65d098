"""Runner settings: built once (in the CLI) and passed down; never a global.

Owns: every tunable, its default, its environment variable and its validation.
n8n's variable names (``N8N_RUNNERS_*``, ``N8N_BLOCK_RUNNER_ENV_ACCESS``) are
accepted with n8n's semantics, so a runner configured for n8n's own Python runner
behaves the same here; our own knobs use the ``SANDBOX_`` prefix. Every variable can
also be given as ``<NAME>_FILE`` (a path whose stripped content is the value), as
n8n allows; the direct variable wins.

Must not: read the environment at import time, import docker or the sandbox.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from runner.analyzer import DEFAULT_BUILTINS_DENY, ImportPolicy, parse_allowlist

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Pure-computation standard modules allowed by default. n8n allows nothing by
# default, which is its users' most common complaint; here the container is the
# wall and the allowlist only a speed bump, so useful modules are on by default.
# Modules that reach the host (os, sys, subprocess, socket, io, pathlib, shutil,
# ctypes, importlib, pickle, marshal, gc, inspect) stay off.
DEFAULT_STDLIB_ALLOW = (
    "array,base64,binascii,bisect,calendar,cmath,collections,colorsys,copy,csv,"
    "dataclasses,datetime,decimal,difflib,enum,fractions,functools,graphlib,hashlib,"
    "heapq,hmac,html,ipaddress,itertools,json,math,numbers,pprint,random,re,secrets,"
    "statistics,string,struct,textwrap,time,typing,unicodedata,uuid,zlib"
)

MIB = 1024 * 1024


def _aliases(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class _FileFallbackSource(EnvSettingsSource):
    """``<NAME>_FILE`` support: when ``NAME`` is unset, read the file ``NAME_FILE`` names."""

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        env = {k.upper(): v for k, v in self.env_vars.items()}
        for field_name, field in self.settings_cls.model_fields.items():
            for alias in _env_names(field_name, field):
                if alias in env:
                    break
                path = env.get(f"{alias}_FILE")
                if path is None:
                    continue
                try:
                    data[field_name] = Path(path).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ValueError(
                        f"Failed to read {alias}_FILE from file {path}: {exc}"
                    ) from exc
                break
        return data


def _env_names(field_name: str, field: FieldInfo) -> list[str]:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice).upper() for choice in alias.choices]
    if isinstance(alias, str):
        return [alias.upper()]
    return [f"SANDBOX_{field_name}".upper()]


def _n8n_bool(value: object) -> bool:
    """n8n's booleans: true only when the value is ``true`` (case-insensitive, trimmed)."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() == "true"


class Settings(BaseSettings):
    """Every setting of the runner. Build with ``Settings()`` (reads the environment)."""

    model_config = SettingsConfigDict(
        env_prefix="SANDBOX_",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # --- n8n-compatible (same names, defaults and meaning as n8n's runner) ---
    task_timeout_s: float = Field(
        60,
        gt=0,
        validation_alias=_aliases("N8N_RUNNERS_TASK_TIMEOUT", "SANDBOX_TASK_TIMEOUT"),
        description="Wall-clock limit of one task, in seconds.",
    )
    stdlib_allow: str = Field(
        DEFAULT_STDLIB_ALLOW,
        validation_alias=_aliases("N8N_RUNNERS_STDLIB_ALLOW", "SANDBOX_STDLIB_ALLOW"),
        description="Standard-library modules task code may import (comma list, or *).",
    )
    external_allow: str = Field(
        "",
        validation_alias=_aliases("N8N_RUNNERS_EXTERNAL_ALLOW", "SANDBOX_EXTERNAL_ALLOW"),
        description="Third-party packages task code may import (comma list, or *).",
    )
    builtins_deny: str = Field(
        ",".join(DEFAULT_BUILTINS_DENY),
        validation_alias=_aliases("N8N_RUNNERS_BUILTINS_DENY", "SANDBOX_BUILTINS_DENY"),
        description="Builtins removed from task code's namespace (comma list).",
    )
    block_env_access: bool = Field(
        True,
        validation_alias=_aliases("N8N_BLOCK_RUNNER_ENV_ACCESS", "SANDBOX_BLOCK_ENV_ACCESS"),
        description="Clear os.environ before task code runs.",
    )

    # --- per-task container limits ---
    memory_mb: int = Field(256, ge=16, description="Memory limit (swap included), MiB.")
    cpus: float = Field(1.0, gt=0, le=64, description="CPU quota, in CPUs.")
    pids_limit: int = Field(64, ge=8, description="Maximum processes and threads.")
    tmpfs_mb: int = Field(16, ge=1, description="Size of the task's /tmp tmpfs, MiB.")
    output_bytes: int = Field(
        16 * MIB,
        ge=4096,
        description="Cap on what a task may output (result, prints, stdout/stderr), bytes.",
    )
    nofile: int = Field(256, ge=32, description="Open-file limit (RLIMIT_NOFILE).")
    fsize_mb: int = Field(16, ge=1, description="Largest file a task may write, MiB.")
    nproc: int = Field(
        4096,
        ge=64,
        description=(
            "RLIMIT_NPROC backstop. It counts every process of the task uid on the host, "
            "so it must exceed pids_limit x concurrency; the pids cgroup is the real limit."
        ),
    )
    max_print_calls: int = Field(100, ge=0, description="Print calls kept per task.")

    # --- image and policy ---
    image: str | None = Field(
        None, description="Task image to use instead of the one built from sandbox_image/."
    )
    base_image: str | None = Field(
        None,
        description=(
            "Registry base image for the task image (e.g. debian:bookworm-slim). "
            "Unset: bootstrap a Debian base from the host's apt mirror."
        ),
    )
    debian_mirror: str | None = Field(
        None, description="Debian mirror for the bootstrap. Unset: read from apt sources."
    )
    debian_suite: str = Field("bookworm", description="Debian suite of the bootstrapped base.")
    policy_dir: Path = Field(PROJECT_ROOT / "policies", description="The policy bundle.")
    image_dir: Path = Field(PROJECT_ROOT / "sandbox_image", description="Task image sources.")
    apparmor_profile: str = Field(
        "sandbox-task", description="AppArmor profile applied when the host has AppArmor."
    )

    # --- runner identity and Docker ---
    runner_id: str = Field(
        default_factory=socket.gethostname,
        description="Owner label on our containers; the start-up sweep removes this "
        "runner's leftovers from earlier runs.",
    )
    docker_api_timeout_s: float = Field(60, gt=0, description="Timeout of one Docker API call.")
    setup_attempts: int = Field(
        4, ge=1, le=20, description="Attempts for container set-up (create/attach/start)."
    )
    setup_backoff_max_s: float = Field(
        4.0, gt=0, description="Cap of the exponential back-off between set-up attempts."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileFallbackSource(settings_cls))

    @field_validator("block_env_access", mode="before")
    @classmethod
    def _parse_n8n_bool(cls, value: object) -> bool:
        return _n8n_bool(value)

    @model_validator(mode="after")
    def _check_allowlists(self) -> Settings:
        # Fail fast with n8n's texts instead of at the first task.
        parse_allowlist(self.stdlib_allow, "N8N_RUNNERS_STDLIB_ALLOW")
        parse_allowlist(self.external_allow, "N8N_RUNNERS_EXTERNAL_ALLOW")
        return self

    @property
    def import_policy(self) -> ImportPolicy:
        return ImportPolicy.from_env_strings(self.stdlib_allow, self.external_allow)

    @property
    def builtins_deny_list(self) -> tuple[str, ...]:
        # n8n splits on "," and trims; an empty string denies nothing.
        return tuple(sorted({name.strip() for name in self.builtins_deny.split(",")} - {""}))

    @property
    def seccomp_profile_path(self) -> Path:
        return self.policy_dir / "seccomp" / "task.json"


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build settings from the environment, with explicit overrides (CLI flags) on top."""
    return Settings(**dict(overrides or {}))


def settings_table() -> str:
    """The configuration table of the README, generated from this model (kept in sync by a test)."""
    rows = [
        "| Environment variable | Default | Meaning |",
        "| --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        names = " / ".join(f"`{alias}`" for alias in _env_names(name, field))
        if field.default_factory is not None:
            default = "hostname" if name == "runner_id" else "computed"
        elif isinstance(field.default, Path):
            default = f"`{field.default.relative_to(PROJECT_ROOT)}`"
        elif isinstance(field.default, bool):
            default = f"`{str(field.default).lower()}`"
        elif field.default in (None, ""):
            default = "unset"
        elif name == "stdlib_allow":
            default = "curated pure-computation modules (see `runner/settings.py`)"
        elif name == "builtins_deny":
            default = "n8n's list (eval, exec, open, type, getattr, ...)"
        else:
            default = f"`{field.default}`"
        rows.append(f"| {names} | {default} | {field.description or ''} |")
    return "\n".join(rows)
