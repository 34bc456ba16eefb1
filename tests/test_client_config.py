"""The one client factory (infra/client.py) and `temporalio.envconfig`: which server, which
namespace and which credentials a process uses, from our settings, TEMPORAL_* variables and a
profile file."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from infra.client import connect, connect_config, load_profile

PROFILES = """
[profile.default]
address = "file-default:7233"

[profile.cloud]
address = "eu-west-1.aws.api.temporal.io:7233"
namespace = "orders.a1b2c"
api_key = "key-from-file"

[profile.mtls]
address = "orders.a1b2c.tmprl.cloud:7233"
namespace = "orders.a1b2c"
[profile.mtls.tls]
client_cert_data = "CERT"
client_key_data = "KEY"
server_name = "frontend.internal"
[profile.mtls.grpc_meta]
x-team = "cancellations"
"""


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    path = tmp_path / "temporal.toml"
    path.write_text(PROFILES)
    return path


def test_nothing_configured_is_the_embedded_dev_server() -> None:
    assert connect_config(environ={}) == {"target_host": "127.0.0.1:7233", "namespace": "default"}
    # The signature every caller used so far still means what it meant.
    assert connect_config("127.0.0.1:9999", "ns", environ={}) == {
        "target_host": "127.0.0.1:9999",
        "namespace": "ns",
    }


def test_a_profile_file_is_read_only_when_asked_for(
    profiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".config" / "temporalio").mkdir(parents=True)
    (home / ".config" / "temporalio" / "temporal.toml").write_text(PROFILES)
    monkeypatch.setenv("HOME", str(home))  # the SDK finds the default file from the real env
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    # A personal default file does not redirect the dev stack or the tests...
    assert load_profile({}).address is None
    # ...but naming a file, or a profile, does.
    assert load_profile({"TEMPORAL_CONFIG_FILE": str(profiles)}).address == "file-default:7233"
    assert load_profile({"TEMPORAL_PROFILE": "default"}).address == "file-default:7233"


def test_temporal_cloud_with_an_api_key(profiles: Path) -> None:
    env = {"TEMPORAL_CONFIG_FILE": str(profiles), "TEMPORAL_PROFILE": "cloud"}
    config = connect_config(environ=env)
    assert config == {
        "target_host": "eu-west-1.aws.api.temporal.io:7233",
        "namespace": "orders.a1b2c",
        "api_key": "key-from-file",
        "tls": True,
    }
    # The key from a Secret (TEMPORAL_API_KEY) wins over the file's.
    env["TEMPORAL_API_KEY"] = "key-from-secret"
    assert connect_config(environ=env)["api_key"] == "key-from-secret"


def test_our_address_and_namespace_win_over_the_profile(profiles: Path) -> None:
    env = {"TEMPORAL_CONFIG_FILE": str(profiles), "TEMPORAL_PROFILE": "cloud"}
    config = connect_config("other:7233", "other-ns", environ=env)
    assert (config["target_host"], config["namespace"]) == ("other:7233", "other-ns")
    assert config["api_key"] == "key-from-file"


def test_mutual_tls_and_grpc_metadata(profiles: Path) -> None:
    config = connect_config(
        environ={"TEMPORAL_CONFIG_FILE": str(profiles), "TEMPORAL_PROFILE": "mtls"}
    )
    tls = config["tls"]
    assert isinstance(tls, TLSConfig)
    assert (tls.client_cert, tls.client_private_key, tls.domain) == (
        b"CERT",
        b"KEY",
        "frontend.internal",
    )
    assert config["rpc_metadata"] == {"x-team": "cancellations"}


def test_tls_from_environment_variables_alone(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("CERT")
    key.write_text("KEY")
    config = connect_config(
        "frontend:7233",
        "orders",
        environ={
            "TEMPORAL_TLS_CLIENT_CERT_PATH": str(cert),
            "TEMPORAL_TLS_CLIENT_KEY_PATH": str(key),
        },
    )
    tls = config["tls"]
    assert isinstance(tls, TLSConfig)
    assert (tls.client_cert, tls.client_private_key) == (b"CERT", b"KEY")


def test_empty_variables_count_as_unset() -> None:
    """An optional Secret key comes out empty; an empty API key must not switch TLS on."""
    env = {"TEMPORAL_API_KEY": "", "TEMPORAL_TLS_CLIENT_CERT_PATH": "", "TEMPORAL_PROFILE": ""}
    assert connect_config(environ=env) == {"target_host": "127.0.0.1:7233", "namespace": "default"}


def test_a_wrong_profile_fails_loudly(profiles: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="'nope'"):
        load_profile({"TEMPORAL_CONFIG_FILE": str(profiles), "TEMPORAL_PROFILE": "nope"})
    env = {
        "TEMPORAL_TLS_CLIENT_CERT_PATH": str(tmp_path / "missing.crt"),
        "TEMPORAL_TLS_CLIENT_KEY_PATH": str(tmp_path / "missing.key"),
    }
    with pytest.raises(FileNotFoundError):
        connect_config(environ=env)


async def test_connect_uses_the_profile(tmp_path: Path) -> None:
    """A real connection whose address comes from the profile file alone (no TLS: the test
    server has none; the TLS arguments are checked above)."""
    import shutil

    from temporalio.testing import WorkflowEnvironment

    from devstack.embedded import temporal_binary

    assert shutil.which(temporal_binary())
    env_server = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), namespace="orders"
    )
    try:
        target = env_server.client.service_client.config.target_host
        path = tmp_path / "temporal.toml"
        path.write_text(f'[profile.local]\naddress = "{target}"\nnamespace = "orders"\n')
        client = await connect(
            environ={"TEMPORAL_CONFIG_FILE": str(path), "TEMPORAL_PROFILE": "local"}
        )
        assert (client.service_client.config.target_host, client.namespace) == (target, "orders")
        assert await client.count_workflows() is not None
    finally:
        await env_server.shutdown()


# --- every process connects with the credentials (issue 18) ----------------------------------


class _Connected(Exception):
    """Raised by the fake `Client.connect` once it has seen its arguments."""


@pytest.fixture
def connect_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    calls: list[dict[str, object]] = []

    async def fake_connect(target_host: str, **kwargs: object) -> None:
        calls.append({"target_host": target_host, **kwargs})
        raise _Connected

    monkeypatch.setattr("infra.client.Client.connect", fake_connect)
    return calls


def _clear_temporal_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("TEMPORAL_", "ORDERCANCEL_TEMPORAL_")):
            monkeypatch.delenv(name)


async def _open_each_process(database_url: str) -> None:
    """What `ordercancel worker` and the CLI commands (infra.stack.open_stack) and
    `ordercancel api` (api.app.connected) open, each until it calls Client.connect."""
    from api.app import connected
    from infra.settings import Settings
    from infra.stack import open_stack

    for opener in (
        lambda: open_stack(Settings(database_url=database_url)),
        lambda: connected(Settings(database_url=database_url))(),
    ):
        with pytest.raises(RuntimeError, match="cannot reach Temporal") as raised:
            async with opener():
                pass
        assert isinstance(raised.value.__cause__, _Connected)


async def test_every_process_connects_with_the_api_key_and_client_certificate_of_the_env(
    database_url: str,
    connect_calls: list[dict[str, object]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clear_temporal_env(monkeypatch)
    monkeypatch.setenv("TEMPORAL_ADDRESS", "frontend.example:7233")
    monkeypatch.setenv("TEMPORAL_NAMESPACE", "orders")
    monkeypatch.setenv("TEMPORAL_API_KEY", "key-from-secret")
    monkeypatch.setenv("TEMPORAL_TLS_CLIENT_CERT_DATA", "CERT")
    monkeypatch.setenv("TEMPORAL_TLS_CLIENT_KEY_DATA", "KEY")
    monkeypatch.setenv("TEMPORAL_TLS_SERVER_NAME", "frontend.internal")
    await _open_each_process(database_url)
    assert len(connect_calls) == 2
    for call in connect_calls:
        assert (call["target_host"], call["namespace"], call["api_key"]) == (
            "frontend.example:7233",
            "orders",
            "key-from-secret",
        )
        tls = call["tls"]
        assert isinstance(tls, TLSConfig)
        assert (tls.client_cert, tls.client_private_key, tls.domain) == (
            b"CERT",
            b"KEY",
            "frontend.internal",
        )


async def test_every_process_connects_with_the_mtls_profile_of_the_file(
    database_url: str,
    profiles: Path,
    connect_calls: list[dict[str, object]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clear_temporal_env(monkeypatch)
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(profiles))
    monkeypatch.setenv("TEMPORAL_PROFILE", "mtls")
    await _open_each_process(database_url)
    assert len(connect_calls) == 2
    for call in connect_calls:
        assert (call["target_host"], call["namespace"]) == (
            "orders.a1b2c.tmprl.cloud:7233",
            "orders.a1b2c",
        )
        tls = call["tls"]
        assert isinstance(tls, TLSConfig) and tls.client_cert == b"CERT"
        assert call["rpc_metadata"] == {"x-team": "cancellations"}


def test_only_the_client_factory_calls_client_connect() -> None:
    """The worker, the API, the CLI, the tools and the dev stack all connect through
    infra/client.py, so the credentials above reach every one of them."""
    root = Path(__file__).resolve().parent.parent
    # The embedded dev server's start-up probe talks to the plaintext server it just spawned on
    # the loopback, never to a configured cluster.
    exempt = {root / "infra" / "client.py", root / "devstack" / "embedded.py"}
    offenders = []
    for package in ("api", "cli", "workers", "starter", "infra", "devstack", "tools", "ledger"):
        for path in (root / package).rglob("*.py"):
            if path in exempt:
                continue
            if "Client.connect(" in path.read_text():
                offenders.append(str(path.relative_to(root)))
    assert not offenders
