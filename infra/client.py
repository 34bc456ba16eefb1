"""The one Temporal client factory: worker, CLI and tests all get the data converter here (the
SDK's pydantic one, lenient with undecodable message arguments: infra/converter.py).

How to reach a secured cluster or Temporal Cloud (TLS client certificates, an API key, gRPC
metadata) comes from `temporalio.envconfig`: the `TEMPORAL_*` environment variables over a
profile of a TOML file (docs/configuration.md, deploy/temporal.toml.example). An address or a
namespace passed in (our Settings: `TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`) wins over the
profile's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from temporalio.client import Client
from temporalio.envconfig import ClientConfigProfile, ClientConnectConfig
from temporalio.runtime import Runtime

from infra.converter import data_converter
from infra.tracing import client_interceptors

DEFAULT_ADDRESS = "127.0.0.1:7233"
DEFAULT_NAMESPACE = "default"


def load_profile(environ: Mapping[str, str] | None = None) -> ClientConfigProfile:
    """The envconfig profile: `TEMPORAL_*` variables over the profile file.

    The file is read only when `TEMPORAL_CONFIG_FILE` or `TEMPORAL_PROFILE` asks for it, so a
    personal ~/.config/temporalio/temporal.toml (say, with a Cloud API key) never redirects the
    embedded dev stack or the tests. A profile that is asked for and missing is an error. An
    empty `TEMPORAL_*` variable counts as unset (an optional Secret key comes out empty; an
    empty `TEMPORAL_API_KEY` would otherwise switch TLS on).
    """
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if v or not k.startswith("TEMPORAL_")}
    wants_file = bool(env.get("TEMPORAL_CONFIG_FILE") or env.get("TEMPORAL_PROFILE"))
    try:
        return ClientConfigProfile.load(disable_file=not wants_file, override_env_vars=env)
    except RuntimeError as err:  # the SDK's ConfigError: unknown profile, malformed TOML
        where = env.get("TEMPORAL_CONFIG_FILE") or "~/.config/temporalio/temporal.toml"
        raise RuntimeError(
            f"Temporal client profile {env.get('TEMPORAL_PROFILE') or 'default'!r}"
            f" from {where}: {err}"
        ) from err


def connect_config(
    address: str | None = None,
    namespace: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> ClientConnectConfig:
    """`Client.connect` arguments: the profile's, with `address`/`namespace` when given.

    Reads the TLS files the profile names, so a missing certificate fails here, loudly.
    """
    config = load_profile(environ).to_client_connect_config()
    config["target_host"] = address or config.get("target_host") or DEFAULT_ADDRESS
    config["namespace"] = namespace or config.get("namespace") or DEFAULT_NAMESPACE
    return config


async def connect(
    address: str | None = None,
    namespace: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    runtime: Runtime | None = None,
) -> Client:
    """`runtime`: the one serving Prometheus metrics (infra.metrics), for a worker's client.
    While tracing is on in this process (infra.tracing), the client carries the SDK's tracing
    interceptor, and so does a worker built on it."""
    config = connect_config(address, namespace, environ=environ)
    return await Client.connect(
        config["target_host"],
        namespace=config["namespace"],
        api_key=config.get("api_key"),
        tls=config.get("tls"),
        rpc_metadata=config.get("rpc_metadata", {}),
        data_converter=data_converter,
        runtime=runtime,
        interceptors=client_interceptors(),
    )
