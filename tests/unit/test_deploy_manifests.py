"""deploy/ stays deployable: the Kubernetes manifests against Kubernetes' own schemas, and
both deployments (Kubernetes, Compose) against the runner's settings.

- every document in deploy/k8s is valid for Kubernetes :data:`KUBERNETES_VERSION`,
  strictly (an unknown or misspelt field is refused), by kubernetes-validate's bundled
  OpenAPI schemas: no cluster, no network;
- the brokers are a Deployment of 2 replicas on one Redis (``SANDBOX_BROKER_STORE`` is a
  ``redis://`` URL naming the Redis Service and its port) behind a Service that keeps a
  runner on one broker; the runners are a DaemonSet whose broker URI names that Service,
  with the node's Docker socket; the probes hit the ports the services listen on;
- every ``SANDBOX_*`` / ``N8N_*`` variable they set is a setting of runner/settings.py
  (a renamed setting breaks this test), no Service link shadows one, every secret they
  read is a key of the Secret, and the Secret's placeholder API keys are refused;
- deploy/compose/compose.yaml: two brokers on one Redis with different published ports,
  two runners given both brokers' URIs and the host's Docker socket, the same variables
  checked; Redis run the same way in both.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from helpers import SETTINGS_PREFIXES
from pydantic import ValidationError

from runner.runner_image import RUNNER_UID
from runner.settings import PROJECT_ROOT, Settings, _env_names

# The oldest Kubernetes the manifests are for (every API they use is stable there); the
# floor of kubernetes-validate in pyproject.toml (>=1.30) bundles its schemas.
KUBERNETES_VERSION = "1.30.0"
K8S = PROJECT_ROOT / "deploy" / "k8s"
COMPOSE = PROJECT_ROOT / "deploy" / "compose" / "compose.yaml"
DOCKER_SOCKET = "/var/run/docker.sock"
# What Redis must run with, in both deployments (docs/operations.md explains each).
REDIS_FLAGS = {
    "--appendonly": "yes",
    "--appendfsync": "everysec",
    "--maxmemory-policy": "noeviction",
}


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                found.append((path.name, document))
    return found


MANIFESTS = _manifests()


def _id(manifest: tuple[str, dict[str, Any]]) -> str:
    name, document = manifest
    return f"{name}:{document['kind']}/{document['metadata']['name']}"


def _one(kind: str, component: str | None = None) -> dict[str, Any]:
    """The only document of ``kind`` (of that ``app.kubernetes.io/component``)."""
    found = [
        document
        for _, document in MANIFESTS
        if document["kind"] == kind
        and (
            component is None
            or document["metadata"].get("labels", {}).get("app.kubernetes.io/component")
            == component
        )
    ]
    assert len(found) == 1, f"{len(found)} {kind} documents for {component!r} in deploy/k8s"
    return found[0]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = _pod(workload)["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    container: dict[str, Any] = containers[0]
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def _known_variables() -> set[str]:
    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        names.update(_env_names(field_name, field))
    return names


def _unknown_settings(names: set[str]) -> set[str]:
    """The runner variables among ``names`` that no setting reads (``_FILE``: the file
    form of any setting)."""
    known = _known_variables()
    ours = {name for name in names if name.startswith(SETTINGS_PREFIXES)}
    return {name for name in ours if name.removesuffix("_FILE") not in known}


def _port_of(container: dict[str, Any], port: int | str) -> int:
    """A container port given by number or by name."""
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in by_name, f"no port named {port!r} in {container['name']}"
    return int(by_name[port])


def _selects(service: dict[str, Any], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def _service_port(service: dict[str, Any], workload: dict[str, Any]) -> tuple[int, int]:
    """The Service's port and the workload's container port it sends to."""
    (port,) = service["spec"]["ports"]
    return int(port["port"]), _port_of(_container(workload), port.get("targetPort", port["port"]))


# -- the schemas --------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", MANIFESTS, ids=_id)
def test_every_manifest_is_valid_kubernetes(manifest: tuple[str, dict[str, Any]]) -> None:
    _, document = manifest
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        problem = f"{_id(manifest)}: {exc.message} (at {where or 'the top'})"
    else:
        return
    pytest.fail(problem, pytrace=False)  # out of the except: no schema dump in the report


def test_the_manifests_are_one_namespace_of_the_expected_objects() -> None:
    kinds = sorted(_id(m).split(":", 1)[1] for m in MANIFESTS)
    assert kinds == [
        "DaemonSet/sandbox-runner",
        "Deployment/sandbox-broker",
        "Namespace/sandbox-runner",
        "NetworkPolicy/sandbox-redis",
        "PodDisruptionBudget/sandbox-broker",
        "Secret/sandbox-runner",
        "Service/sandbox-broker",
        "Service/sandbox-redis",
        "StatefulSet/sandbox-redis",
    ]
    namespace = _one("Namespace")["metadata"]["name"]
    for manifest in MANIFESTS:
        if manifest[1]["kind"] != "Namespace":
            assert manifest[1]["metadata"].get("namespace") == namespace, _id(manifest)
    # `kubectl apply -f deploy/k8s/` applies the files in name order: the namespace first.
    assert MANIFESTS[0][1]["kind"] == "Namespace"


# -- the brokers ---------------------------------------------------------------------------


def test_two_brokers_share_the_redis_service() -> None:
    broker = _one("Deployment", "broker")
    assert broker["spec"]["replicas"] == 2
    container = _container(broker)
    assert container["args"][0] == "broker"
    env = _env(container)
    store = env["SANDBOX_BROKER_STORE"]["value"]
    url = urlsplit(store)
    assert url.scheme == "redis", store
    redis_service = _one("Service", "redis")
    redis = _one("StatefulSet", "redis")
    assert url.hostname == redis_service["metadata"]["name"], store
    service_port, redis_port = _service_port(redis_service, redis)
    assert url.port == service_port, store
    assert redis_port == 6379
    assert _selects(redis_service, redis)
    assert re.fullmatch(r"/\d+", url.path), f"{store}: no database number"
    # The password in the URL is the one Redis requires: the same secret key, put in by
    # Kubernetes from a variable defined before the URL.
    assert url.password == "$(REDIS_PASSWORD)", store
    names = list(env)
    assert names.index("REDIS_PASSWORD") < names.index("SANDBOX_BROKER_STORE")
    redis_container = _container(redis)
    assert "$(REDIS_PASSWORD)" in redis_container["args"]
    password_ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert _env(redis_container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == password_ref


def test_the_broker_service_keeps_a_runner_on_one_broker() -> None:
    broker = _one("Deployment", "broker")
    service = _one("Service", "broker")
    assert _selects(service, broker)
    # A grant token from POST /runners/auth is valid on the broker that issued it only,
    # and the WebSocket that presents it is another connection.
    assert service["spec"].get("sessionAffinity") == "ClientIP"
    _, target = _service_port(service, broker)
    container = _container(broker)
    args = container["args"]
    default = Settings.model_fields["broker_port"].default
    port = int(args[args.index("--port") + 1]) if "--port" in args else default
    assert target == port
    assert args[args.index("--host") + 1] == "0.0.0.0"  # reachable from other pods
    for probe in ("readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/healthz", probe  # the broker's unauthenticated probe
        assert _port_of(container, check["port"]) == port, probe
    disruption = _one("PodDisruptionBudget")
    assert disruption["spec"]["minAvailable"] == 1
    labels = broker["spec"]["template"]["metadata"]["labels"]
    assert disruption["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- the runners ---------------------------------------------------------------------------


def test_the_runners_reach_the_brokers_service_and_the_nodes_docker() -> None:
    runner = _one("DaemonSet", "runner")
    service = _one("Service", "broker")
    service_port, _ = _service_port(service, _one("Deployment", "broker"))
    container = _container(runner)
    assert container["args"] == ["serve"]
    uris = _env(container)["N8N_RUNNERS_TASK_BROKER_URI"]["value"].split(",")
    for uri in uris:
        url = urlsplit(uri.strip())
        assert url.hostname == service["metadata"]["name"], uri
        assert url.port == service_port, uri
    socket_volume = next(
        v for v in _pod(runner)["volumes"] if v.get("hostPath", {}).get("path") == DOCKER_SOCKET
    )
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[socket_volume["name"]] == DOCKER_SOCKET
    security = _pod(runner)["securityContext"]
    assert security["runAsUser"] == RUNNER_UID  # the image's user, not root
    assert security["supplementalGroups"], "the socket's group"
    health_port = Settings.model_fields["health_check_server_port"].default
    for probe in ("startupProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert _port_of(container, check["port"]) == health_port, probe


def test_no_pod_gets_its_own_settings_from_service_links() -> None:
    """Kubernetes gives every pod ``<SERVICE>_PORT=tcp://...`` for each Service of its
    namespace unless ``enableServiceLinks`` is false: ``sandbox-broker`` would set
    ``SANDBOX_BROKER_PORT``, the broker's port setting, and no broker or runner starts."""
    links = set()
    for _, document in MANIFESTS:
        if document["kind"] == "Service":
            prefix = document["metadata"]["name"].upper().replace("-", "_")
            links |= {f"{prefix}_PORT", f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT"}
    assert links & _known_variables(), "no collision left: this test can go"
    for _, document in MANIFESTS:
        if document["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            assert _pod(document).get("enableServiceLinks") is False, document["metadata"]


def test_the_variables_they_set_are_settings_of_the_runner() -> None:
    for component, kind in (("broker", "Deployment"), ("runner", "DaemonSet")):
        env = set(_env(_container(_one(kind, component))))
        assert env & _known_variables(), component
        unknown = _unknown_settings(env)
        assert not unknown, f"{component}: not settings of the runner: {sorted(unknown)}"


def test_every_secret_they_read_is_in_the_secret() -> None:
    secret = _one("Secret")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    read = set()
    for _, document in MANIFESTS:
        if document["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            for entry in _env(_container(document)).values():
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["name"] == secret["metadata"]["name"], entry
                    read.add(ref["key"])
    assert read == keys
    # Runners and brokers share one token.
    broker = _env(_container(_one("Deployment", "broker")))
    runner = _env(_container(_one("DaemonSet", "runner")))
    assert (
        broker["SANDBOX_AUTH_TOKEN"]["valueFrom"] == runner["N8N_RUNNERS_AUTH_TOKEN"]["valueFrom"]
    )


@pytest.mark.usefixtures("clean_env")
def test_the_secrets_placeholder_api_keys_cannot_serve() -> None:
    """Applied as shipped, the brokers refuse to start instead of serving anyone who
    read the placeholder."""
    placeholder = _one("Secret")["stringData"]["api-keys"]
    assert "REPLACE-ME" in placeholder
    with pytest.raises(ValidationError, match="SANDBOX_API_KEYS"):
        Settings(api_keys=placeholder)


# -- Compose ---------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def _interpolate(value: Any, given: Mapping[str, str]) -> Any:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}``, enough to read
    the file's values: a variable not in ``given`` takes its default, and one without a
    default (a required one) stands for itself, its name."""
    if isinstance(value, dict):
        return {k: _interpolate(v, given) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, given) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, operator, rest = match.groups()
        if name in given:
            return given[name]
        if operator in (":-", "-"):
            return str(rest)
        return str(name)

    return _VARIABLE.sub(one, value)


def _compose(given: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services: dict[str, Any] = _interpolate(raw["services"], given or {})
    return services


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(entry.split("=", 1) for entry in env)
    return {str(k): str(v) for k, v in env.items()}


def _brokers(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if s.get("command", [None])[0] == "broker"}


def _runners(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if s.get("command", [None])[0] == "serve"}


def test_compose_has_two_brokers_on_one_redis_and_two_runners() -> None:
    services = _compose()
    brokers, runners = _brokers(services), _runners(services)
    assert sorted(brokers) == ["broker-a", "broker-b"]
    assert len(runners) == 2
    stores = {_compose_env(s)["SANDBOX_BROKER_STORE"] for s in brokers.values()}
    assert len(stores) == 1, stores  # one Redis for both: one queue
    url = urlsplit(stores.pop())
    assert url.scheme == "redis"
    assert url.hostname in services, f"{url.hostname}: not a service of the file"
    assert url.port == 6379
    redis = services[url.hostname]
    assert "--requirepass" in redis["command"]
    assert url.password == redis["command"][redis["command"].index("--requirepass") + 1]
    published = []
    for name, broker in brokers.items():
        (mapping,) = broker["ports"]
        host_port, container_port = mapping.rsplit(":", 2)[-2:]
        assert container_port == "5679", name
        published.append(host_port)
    assert len(set(published)) == 2, published


def test_compose_runners_know_both_brokers_and_reach_the_hosts_docker() -> None:
    services = _compose()
    brokers = _brokers(services)
    tokens = {_compose_env(b)["SANDBOX_AUTH_TOKEN"] for b in brokers.values()}
    for name, runner in _runners(services).items():
        env = _compose_env(runner)
        uris = [urlsplit(u.strip()) for u in env["N8N_RUNNERS_TASK_BROKER_URI"].split(",")]
        assert {u.hostname for u in uris} == set(brokers), name
        assert {u.port for u in uris} == {5679}, name
        assert {env["N8N_RUNNERS_AUTH_TOKEN"]} == tokens, name
        assert f"{DOCKER_SOCKET}:{DOCKER_SOCKET}" in _interpolate(runner["volumes"], {}), name
        assert runner["group_add"], name
    first = {
        urlsplit(_compose_env(r)["N8N_RUNNERS_TASK_BROKER_URI"].split(",")[0]).hostname
        for r in _runners(services).values()
    }
    assert first == set(brokers), "each broker is some runner's first"


def test_compose_variables_are_settings_of_the_runner() -> None:
    services = _compose()
    for name, service in {**_brokers(services), **_runners(services)}.items():
        unknown = _unknown_settings(set(_compose_env(service)))
        assert not unknown, f"{name}: not settings of the runner: {sorted(unknown)}"


def test_compose_images_come_from_variables() -> None:
    given = {"SANDBOX_RUNNER_IMAGE": "runner:test", "REDIS_IMAGE": "redis:test"}
    services = _compose(given)
    assert {s["image"] for s in services.values()} == {"runner:test", "redis:test"}
    defaults = _compose()
    assert defaults["redis"]["image"] == "redis:7"
    assert defaults["broker-a"]["image"] == "sandbox-runner:latest"


def _flags(argv: list[str]) -> Iterator[tuple[str, str]]:
    for flag, value in itertools.pairwise(argv):
        if flag.startswith("--"):
            yield flag, value


def test_redis_runs_the_same_in_both() -> None:
    compose = dict(_flags(_compose()["redis"]["command"]))
    k8s = dict(_flags(_container(_one("StatefulSet", "redis"))["args"]))
    for flag, value in REDIS_FLAGS.items():
        assert compose.get(flag) == value, ("compose", flag)
        assert k8s.get(flag) == value, ("k8s", flag)


def test_the_docs_point_at_both() -> None:
    text = (PROJECT_ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "../deploy/compose/compose.yaml" in text
    assert "../deploy/k8s/" in text
