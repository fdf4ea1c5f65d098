"""Runner settings: built once (in the CLI) and passed down; never a global.

Owns: every tunable, its default, its environment variable and its validation.
n8n's variable names (``N8N_RUNNERS_*``, ``N8N_BLOCK_RUNNER_ENV_ACCESS``) are
accepted with n8n's semantics, so a runner configured for n8n's own Python runner
behaves the same here; our own knobs use the ``SANDBOX_`` prefix. Every variable can
also be given as ``<NAME>_FILE`` (a path whose stripped content is the value), as
n8n allows; the direct variable wins.

Limits, allowlists, the builtins deny list and the AppArmor profile name have no
default here: unset means "the policy bundle's default" (``policies/sandbox.toml``),
and :mod:`runner.policy` refuses any value beyond the bundle's ceilings.

Every limit carries the floor of :data:`runner.sandbox.base.MINIMUM_LIMITS` (in this
model's units): a value that would round to nothing (``SANDBOX_CPUS=1e-10``) stops
the runner here, with the variable named.

Must not: read the environment at import time, import docker, the sandbox
implementations or the policy (the policy imports this); ``runner.sandbox.base``
(values only) is fine.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from runner.analyzer import parse_allowlist
from runner.sandbox.base import MINIMUM_LIMITS

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _data_root() -> Path:
    """Where ``policies/`` and ``sandbox_image/`` live.

    In a source checkout: the checkout (next to ``runner/``). From an installed wheel
    (the runner image): ``<prefix>/share/sandbox-runner``, where the image puts them;
    ``SANDBOX_POLICY_DIR`` and ``SANDBOX_IMAGE_DIR`` override either.
    """
    if (PROJECT_ROOT / "policies").is_dir():
        return PROJECT_ROOT
    return Path(sys.prefix) / "share" / "sandbox-runner"


DATA_ROOT = _data_root()

MIB = 1024 * 1024
FLOOR = MINIMUM_LIMITS  # the least of every limit (bytes converted to this model's units)
PIPE_FRAME_LIMIT = 0xFFFFFFFF


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


def _pairs(raw: str, variable: str) -> list[tuple[str, str]]:
    pairs = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        key, sep, value = entry.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{variable} must be comma-separated name=value pairs")
        pairs.append((key.strip(), value.strip()))
    return pairs


def env_name(field_name: str) -> str:
    """The main environment variable of a settings field (n8n's name where there is one)."""
    return _env_names(field_name, Settings.model_fields[field_name])[0]


def _from_policy(key: str) -> dict[str, Any]:
    # Unset means the bundle's default; the README table shows which key.
    return {"policy": key}


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

    # --- n8n-compatible (same names and meaning as n8n's runner) ---
    # Unset (None): the policy bundle's default; a value must stay within its ceiling.
    task_timeout_s: float | None = Field(
        None,
        ge=FLOOR.timeout_s,
        validation_alias=_aliases("N8N_RUNNERS_TASK_TIMEOUT", "SANDBOX_TASK_TIMEOUT"),
        description="Wall-clock limit of one task, in seconds.",
        json_schema_extra=_from_policy("limits.timeout_s"),
    )
    stdlib_allow: str | None = Field(
        None,
        validation_alias=_aliases("N8N_RUNNERS_STDLIB_ALLOW", "SANDBOX_STDLIB_ALLOW"),
        description="Standard-library modules task code may import (comma list, or *).",
        json_schema_extra=_from_policy("imports.stdlib_allow"),
    )
    external_allow: str | None = Field(
        None,
        validation_alias=_aliases("N8N_RUNNERS_EXTERNAL_ALLOW", "SANDBOX_EXTERNAL_ALLOW"),
        description="Third-party packages task code may import (comma list, or *).",
        json_schema_extra=_from_policy("imports.external_allow"),
    )
    builtins_deny: str | None = Field(
        None,
        validation_alias=_aliases("N8N_RUNNERS_BUILTINS_DENY", "SANDBOX_BUILTINS_DENY"),
        description="Builtins removed from task code's namespace (comma list).",
        json_schema_extra=_from_policy("imports.builtins_deny"),
    )
    block_env_access: bool = Field(
        True,
        validation_alias=_aliases("N8N_BLOCK_RUNNER_ENV_ACCESS", "SANDBOX_BLOCK_ENV_ACCESS"),
        description="Clear os.environ before task code runs.",
    )

    # --- per-task container limits (unset: the policy bundle's default) ---
    memory_mb: int | None = Field(
        None,
        ge=FLOOR.memory_bytes // MIB,
        description="Memory limit (swap included), MiB.",
        json_schema_extra=_from_policy("limits.memory_mb"),
    )
    cpus: float | None = Field(
        None,
        ge=FLOOR.cpus,
        le=64,
        description="CPU quota, in CPUs.",
        json_schema_extra=_from_policy("limits.cpus"),
    )
    pids_limit: int | None = Field(
        None,
        ge=FLOOR.pids,
        description="Maximum processes and threads.",
        json_schema_extra=_from_policy("limits.pids"),
    )
    tmpfs_mb: int | None = Field(
        None,
        ge=FLOOR.tmpfs_bytes // MIB,
        description="Size of the task's /tmp tmpfs, MiB.",
        json_schema_extra=_from_policy("limits.tmpfs_mb"),
    )
    output_bytes: int | None = Field(
        None,
        ge=FLOOR.output_bytes,
        description="Cap on what a task may output (result, prints, stdout/stderr), bytes.",
        json_schema_extra=_from_policy("limits.output_bytes"),
    )
    nofile: int | None = Field(
        None,
        ge=FLOOR.nofile,
        description="Open-file limit (RLIMIT_NOFILE).",
        json_schema_extra=_from_policy("limits.nofile"),
    )
    fsize_mb: int | None = Field(
        None,
        ge=FLOOR.fsize_bytes // MIB,
        description="Largest file a task may write, MiB.",
        json_schema_extra=_from_policy("limits.fsize_mb"),
    )
    nproc: int | None = Field(
        None,
        ge=FLOOR.nproc,
        description=(
            "RLIMIT_NPROC backstop. It counts every process of the task uid on the host, "
            "so it must exceed pids_limit x concurrency; the pids cgroup is the real limit."
        ),
        json_schema_extra=_from_policy("limits.nproc"),
    )
    code_bytes: int | None = Field(
        None,
        ge=FLOOR.code_bytes,
        description="Largest task code the runner accepts, UTF-8 bytes; larger code is "
        "refused (code_too_large) before it is parsed.",
        json_schema_extra=_from_policy("limits.code_bytes"),
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
    policy_dir: Path = Field(
        DATA_ROOT / "policies",
        description="The policy bundle (sandbox.toml, seccomp and AppArmor profiles).",
    )
    image_dir: Path = Field(DATA_ROOT / "sandbox_image", description="Task image sources.")
    apparmor_profile: str | None = Field(
        None,
        description="Name under which the bundle's AppArmor profile is loaded on the host "
        "(applied only when the host has AppArmor).",
        json_schema_extra=_from_policy("apparmor.profile"),
    )
    selfcheck_cache_dir: Path | None = Field(
        None,
        description="Where self-check results are cached, per Docker daemon, policy hash and "
        "task image. "
        "Unset: $XDG_CACHE_HOME/sandbox-runner, else ~/.cache/sandbox-runner.",
    )

    # --- broker connection (`serve`; n8n's names and defaults) ---
    task_broker_uri: str = Field(
        "http://127.0.0.1:5679",
        validation_alias=_aliases("N8N_RUNNERS_TASK_BROKER_URI", "SANDBOX_TASK_BROKER_URI"),
        description="Broker to connect to (https:// connects with wss://); several, "
        "comma-separated, for brokers that share a Redis task store: the next one is "
        "tried when one cannot be reached.",
    )
    grant_token: SecretStr | None = Field(
        None,
        validation_alias=_aliases("N8N_RUNNERS_GRANT_TOKEN", "SANDBOX_GRANT_TOKEN"),
        description="Single-use grant token for the first connection.",
    )
    auth_token: SecretStr | None = Field(
        None,
        validation_alias=_aliases("N8N_RUNNERS_AUTH_TOKEN", "SANDBOX_AUTH_TOKEN"),
        description="Shared secret: the runner exchanges it for a fresh grant token before "
        "every connection; the broker checks it on /runners/auth.",
    )
    max_concurrency: int = Field(
        5,
        ge=1,
        validation_alias=_aliases("N8N_RUNNERS_MAX_CONCURRENCY", "SANDBOX_MAX_CONCURRENCY"),
        description="Tasks a runner runs at once (its offer slots).",
    )
    max_payload: int = Field(
        1073741824,
        ge=1024,
        validation_alias=_aliases("N8N_RUNNERS_MAX_PAYLOAD", "SANDBOX_MAX_PAYLOAD"),
        description="Largest WebSocket message, bytes; a bigger result becomes a task error.",
    )
    auto_shutdown_timeout_s: float = Field(
        0,
        ge=0,
        validation_alias=_aliases(
            "N8N_RUNNERS_AUTO_SHUTDOWN_TIMEOUT", "SANDBOX_AUTO_SHUTDOWN_TIMEOUT"
        ),
        description="Exit after this many idle seconds (0: never).",
    )
    graceful_shutdown_timeout_s: float = Field(
        10,
        gt=0,
        validation_alias=_aliases(
            "N8N_RUNNERS_GRACEFUL_SHUTDOWN_TIMEOUT", "SANDBOX_GRACEFUL_SHUTDOWN_TIMEOUT"
        ),
        description="On SIGTERM/SIGINT, how long running tasks may finish before they are killed.",
    )
    health_check_server_enabled: bool = Field(
        False,
        validation_alias=_aliases(
            "N8N_RUNNERS_HEALTH_CHECK_SERVER_ENABLED", "SANDBOX_HEALTH_CHECK_SERVER_ENABLED"
        ),
        description="Serve a health endpoint (any request -> 200 OK).",
    )
    health_check_server_host: str = Field(
        "127.0.0.1",
        validation_alias=_aliases(
            "N8N_RUNNERS_HEALTH_CHECK_SERVER_HOST", "SANDBOX_HEALTH_CHECK_SERVER_HOST"
        ),
        description="Address of the health endpoint.",
    )
    health_check_server_port: int = Field(
        5681,
        ge=0,
        le=65535,
        validation_alias=_aliases(
            "N8N_RUNNERS_HEALTH_CHECK_SERVER_PORT", "SANDBOX_HEALTH_CHECK_SERVER_PORT"
        ),
        description="Port of the health endpoint (0: any free port).",
    )
    undelivered_ttl_s: float = Field(
        300, gt=0, description="How long a finished task's result waits for the broker to return."
    )
    reconnect_backoff_max_s: float = Field(
        30, gt=0, description="Cap of the back-off between broker reconnection attempts."
    )

    # --- embedded broker (`broker`, `up`) ---
    broker_host: str = Field(
        "127.0.0.1",
        validation_alias=_aliases("N8N_RUNNERS_BROKER_LISTEN_ADDRESS", "SANDBOX_BROKER_HOST"),
        description="Address the embedded broker (runner endpoints and HTTP API) listens on.",
    )
    broker_port: int = Field(
        5679,
        ge=0,
        le=65535,
        validation_alias=_aliases("N8N_RUNNERS_BROKER_PORT", "SANDBOX_BROKER_PORT"),
        description="Port of the embedded broker.",
    )
    grant_token_ttl_s: float = Field(
        30,
        gt=0,
        validation_alias=_aliases("N8N_RUNNERS_GRANT_TOKEN_TTL", "SANDBOX_GRANT_TOKEN_TTL"),
        description="Lifetime of a grant token issued by /runners/auth.",
    )
    heartbeat_interval_s: float = Field(
        30,
        gt=0,
        validation_alias=_aliases("N8N_RUNNERS_HEARTBEAT_INTERVAL", "SANDBOX_HEARTBEAT_INTERVAL"),
        description="Seconds between the broker's pings to each runner.",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="API keys of the HTTP API as key=tenant pairs, comma-separated. "
        "Unset: the API serves loopback clients only, as tenant 'default'.",
    )
    tenant_quota: int = Field(4, ge=1, description="Tasks one tenant may have running at once.")
    tenant_quotas: str = Field(
        "", description="Per-tenant overrides of tenant_quota, as tenant=n pairs."
    )
    max_request_bytes: int = Field(
        16 * MIB, ge=1024, description="Largest HTTP request body the API accepts."
    )
    max_request_json_values: int = Field(
        1_000_000,
        ge=1000,
        description="Most JSON values an HTTP request body may hold (counted as its "
        "brackets and commas, before parsing): what bounds the broker's memory while it "
        "parses (~190 bytes per value at worst, so ~200 MB at the default).",
    )
    tenant_queued_bytes: int = Field(
        128 * MIB,
        ge=MIB,
        description="Bytes one tenant's unfinished tasks may hold in the broker (their "
        "code, items, query and outputSchema as JSON); a submission beyond it gets 429 "
        "(413 if it alone is larger).",
    )
    tenant_retained_bytes: int = Field(
        128 * MIB,
        ge=MIB,
        description="Bytes of one tenant's finished result documents the broker keeps; "
        "past it, its oldest results are forgotten (the newest is always kept).",
    )
    queue_timeout_s: float = Field(
        300, gt=0, description="How long a submitted task may wait for a runner."
    )
    broker_timeout_grace_s: float = Field(
        15, ge=0, description="The broker cancels a task this long after its own timeout."
    )
    runner_lost_grace_s: float = Field(
        30,
        gt=0,
        le=3600,
        description="How long a running task waits for its runner to reconnect and report "
        "it before it ends runner_lost (then a retry policy may run it again).",
    )
    broker_store: str = Field(
        "sqlite",
        description="Where the embedded broker keeps its tasks: sqlite (the file "
        "broker-tasks.sqlite3 in the state directory; the runner image names "
        "/var/lib/sandbox-broker) or sqlite:///PATH (relative) / sqlite:////abs/PATH: "
        "queued tasks, results and idempotency keys survive a restart (one broker per "
        "file); memory: lost when it stops (throwaway runs); redis://HOST:PORT/DB: "
        "every broker on that Redis shares one queue and answers for every task "
        "(docs/operations.md, several brokers).",
    )
    broker_lease_s: float = Field(
        10,
        ge=1,
        le=600,
        description="With a Redis store: a broker renews its lease every third of this; "
        "one that has not for this long is taken for dead, and a live broker puts its "
        "tasks back in the shared queue (a running one at its next attempt).",
    )
    broker_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="With a Redis store: this broker's name there and in logs (default: "
        "host name, pid and a random suffix; two live brokers must not share one).",
    )

    # --- runner identity and Docker ---
    runner_id: str = Field(
        default_factory=socket.gethostname,
        description="Owner label on our containers; the start-up sweep removes this "
        "runner's leftovers from earlier runs.",
    )
    docker_api_timeout_s: float = Field(60, gt=0, description="Timeout of one Docker API call.")

    # --- how task containers are made ---
    backend: Literal["auto", "docker", "oci"] = Field(
        "auto",
        description="What makes task containers: docker (the daemon), oci (an OCI runtime "
        "driven directly: no dockerd, containerd or shim per task; needs root and writable "
        "cgroups), or auto (oci when it can run here and its self-check passes, else docker; "
        "the log says why). The runner image sets docker.",
    )
    oci_runtime: str = Field(
        "runc",
        description="The OCI backend's runtime: runc, crun, runsc (gVisor: another kernel "
        "between the task and the host) or a path to one of them.",
    )
    state_dir: Path | None = Field(
        None,
        description="The OCI backend's state (unpacked task images, bundles, the runtime's "
        "state) and the broker's sqlite store. Unset: /var/lib/sandbox-runner as root, else "
        "$XDG_STATE_HOME/sandbox-runner (the runner image sets /var/lib/sandbox-runner-oci).",
    )
    setup_attempts: int = Field(
        4, ge=1, le=20, description="Attempts for container set-up (create/attach/start)."
    )
    setup_backoff_max_s: float = Field(
        4.0, gt=0, description="Cap of the exponential back-off between set-up attempts."
    )

    # --- warm pool ---
    # Default 2: on a small host the daemon, not the pool, bounds sustained
    # throughput (every task still costs one container), so more slots only absorb
    # a larger burst; 2 cover one task running while the next arrives, at ~13 MiB
    # of host memory per idle slot (see bench/README.md).
    pool_size: int = Field(
        2,
        ge=0,
        le=64,
        description="Containers started ahead of time, each waiting for one task "
        "(0: every task starts a cold container).",
    )
    pool_refill_concurrency: int = Field(
        2, ge=1, le=16, description="Pool containers started at the same time by the refill."
    )
    pool_max_idle_s: float = Field(
        300,
        ge=1,
        le=86400,
        description="An idle pool container older than this is replaced; a dead runner's "
        "are swept this long (plus the task timeout) after they were started.",
    )

    # --- logs ---
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text for people, or one JSON object per line (with the "
        "task id) for log pipelines; also `--log-format`.",
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

    @field_validator("max_payload")
    @classmethod
    def _payload_fits_a_pipe_frame(cls, value: int) -> int:
        if value > PIPE_FRAME_LIMIT:
            raise ValueError(
                f"Max payload size of {value} bytes exceeds pipe message limit of "
                f"{PIPE_FRAME_LIMIT} bytes. Reduce N8N_RUNNERS_MAX_PAYLOAD."
            )
        return value

    @field_validator("broker_store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        # The spelling's shape only (runner.broker_server.store.parse_store reads it;
        # settings import nothing of the broker's).
        text = value.strip()
        if text in ("memory", "sqlite") or (
            text.startswith("sqlite:///") and len(text) > len("sqlite:///")
        ):
            return text
        if text.startswith(("redis://", "rediss://")):
            if not text.split("://", 1)[1].rpartition("@")[2].split("/", 1)[0]:
                raise ValueError(f"SANDBOX_BROKER_STORE names no Redis host: {value!r}")
            return text
        raise ValueError(
            "SANDBOX_BROKER_STORE must be memory, sqlite, sqlite:///PATH or "
            f"redis://HOST:PORT/DB, not {value!r}"
        )

    @field_validator("block_env_access", "health_check_server_enabled", mode="before")
    @classmethod
    def _parse_n8n_bool(cls, value: object) -> bool:
        return _n8n_bool(value)

    @model_validator(mode="after")
    def _check_allowlists(self) -> Settings:
        # Fail fast with n8n's texts instead of at the first task.
        if self.stdlib_allow is not None:
            parse_allowlist(self.stdlib_allow, "N8N_RUNNERS_STDLIB_ALLOW")
        if self.external_allow is not None:
            parse_allowlist(self.external_allow, "N8N_RUNNERS_EXTERNAL_ALLOW")
        _ = self.api_key_tenants, self.tenant_quota_overrides  # fail fast on bad pairs
        return self

    @property
    def api_key_tenants(self) -> dict[str, str]:
        """API key -> tenant, from ``api_keys`` (``key=tenant,...``)."""
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return dict(_pairs(raw, "SANDBOX_API_KEYS"))

    @property
    def tenant_quota_overrides(self) -> dict[str, int]:
        pairs = _pairs(self.tenant_quotas, "SANDBOX_TENANT_QUOTAS")
        quotas = {tenant: int(quota) if quota.isdigit() else 0 for tenant, quota in pairs}
        if any(quota < 1 for quota in quotas.values()):
            raise ValueError("SANDBOX_TENANT_QUOTAS must be tenant=number pairs, numbers >= 1")
        return quotas


def state_dir(settings: Settings) -> Path:
    """The state directory: ``SANDBOX_STATE_DIR``, else ``/var/lib/sandbox-runner`` for
    root and ``$XDG_STATE_HOME/sandbox-runner`` (``~/.local/state``) for anyone else.
    Read when called, never at import."""
    if settings.state_dir is not None:
        return settings.state_dir
    if os.geteuid() == 0:
        return Path("/var/lib/sandbox-runner")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sandbox-runner"


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build settings from the environment, with explicit overrides (CLI flags) on top."""
    return Settings(**dict(overrides or {}))


def settings_table(policy_defaults: Mapping[str, str] | None = None) -> str:
    """The configuration table of the README, generated from this model (kept in sync by a test).

    ``policy_defaults`` maps a policy key (``limits.memory_mb``) to the text shown for
    it (the bundle's default and ceiling); the README generator reads the bundle.
    """
    rows = [
        "| Environment variable | Default | Meaning |",
        "| --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        names = " / ".join(f"`{alias}`" for alias in _env_names(name, field))
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        policy_key = extra.get("policy")
        if isinstance(policy_key, str):
            shown = (policy_defaults or {}).get(policy_key)
            default = f"{shown} " if shown else ""
            default += f"(policy: `{policy_key}`)"
        elif field.default_factory is not None:
            default = "hostname" if name == "runner_id" else "computed"
        elif isinstance(field.default, Path):
            default = f"`{field.default.relative_to(DATA_ROOT)}`"
        elif isinstance(field.default, bool):
            default = f"`{str(field.default).lower()}`"
        elif field.default in (None, ""):
            default = "unset"
        else:
            default = f"`{field.default}`"
        rows.append(f"| {names} | {default} | {field.description or ''} |")
    return "\n".join(rows)
