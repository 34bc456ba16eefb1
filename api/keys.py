"""API keys: generated, stored hashed, checked in constant time, mapped to a principal.

A key reads `ock_<key id>_<secret>`: the key id (public) finds the one stored entry to compare
with, so a request costs one hash whatever the number of keys. Keys are 256-bit random tokens,
not passwords: a salted SHA-256 cannot be reversed or guessed, and a slow password hash would
only slow every request down. Only `<principal> <key id> sha256$<salt>$<digest>` lines are
configured (a file, or the same lines in an environment variable); the key itself is shown
once, when it is made, and never stored or logged by the service.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

KEY_PREFIX = "ock"
_KEY = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{32,128}})$")
_HASH = re.compile(r"^sha256\$([0-9a-f]{32})\$([0-9a-f]{64})$")
# The key id of docs/api.md's example line: configured, it is a placeholder (api.commands).
DOCS_EXAMPLE_KEY_ID = "fd37dd748cbeb2da"
_SELLER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")  # domain.models.Identifier


class Role(StrEnum):
    BUYER_SERVICE = "buyer-service"
    SELLER = "seller"
    SRE = "sre"
    PAYMENT_PROVIDER = "payment-provider"
    # The order system: posts checkout orders and the events that follow them (R13).
    ORDER_SYSTEM = "order-system"


@dataclass(frozen=True)
class Principal:
    """Who is calling: one of the roles, and for a seller key, which seller."""

    role: Role
    seller_id: str | None = None
    # An SRE key may name its holder (`sre:<operator>`): operators' actions are recorded as
    # theirs (`operator_id`), never as what a request body claims.
    operator: str | None = None

    @classmethod
    def parse(cls, text: str) -> Principal:
        if text.startswith("seller:"):
            seller_id = text.removeprefix("seller:")
            if not _SELLER_ID.fullmatch(seller_id):
                raise ValueError(f"not a seller id: {seller_id!r}")
            return cls(Role.SELLER, seller_id)
        if text.startswith("sre:"):
            operator = text.removeprefix("sre:")
            if not _SELLER_ID.fullmatch(operator):
                raise ValueError(f"not an operator id: {operator!r}")
            return cls(Role.SRE, operator=operator)
        try:
            role = Role(text)
        except ValueError:
            raise ValueError(
                f"unknown principal {text!r} (buyer-service, seller:<seller_id>, sre,"
                " sre:<operator>, payment-provider, order-system)"
            ) from None
        if role is Role.SELLER:
            raise ValueError("a seller principal names its seller: seller:<seller_id>")
        return cls(role)

    @property
    def operator_id(self) -> str:
        """Who an SRE key acts as in the workflow (`operator_id`): its name, else `sre`."""
        return self.operator or self.role.value

    def __str__(self) -> str:
        if self.role is Role.SELLER:
            return f"seller:{self.seller_id}"
        if self.operator is not None:
            return f"{self.role.value}:{self.operator}"
        return self.role.value


class KeyConfigError(ValueError):
    """A keys file or variable that cannot be read; says where, never echoes a hash."""


@dataclass(frozen=True)
class StoredKey:
    principal: Principal
    key_id: str
    salt: bytes
    digest: bytes


def _digest(salt: bytes, key: str) -> bytes:
    return hashlib.sha256(salt + key.encode()).digest()


def generate_key() -> str:
    return f"{KEY_PREFIX}_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    match = _KEY.fullmatch(key)
    return match.group(1) if match else None


def hash_key(key: str, *, salt: bytes | None = None) -> str:
    """`sha256$<salt hex>$<digest hex>` of a key made by `generate_key`."""
    if key_id_of(key) is None:
        raise ValueError(f"not an API key of the form {KEY_PREFIX}_<16 hex>_<secret>")
    salt = salt if salt is not None else secrets.token_bytes(16)
    return f"sha256${salt.hex()}${_digest(salt, key).hex()}"


def key_line(principal: Principal | str, key: str) -> str:
    """The line to add to the keys file for `key`."""
    key_id = key_id_of(key)
    if key_id is None:
        raise ValueError(f"not an API key of the form {KEY_PREFIX}_<16 hex>_<secret>")
    principal = principal if isinstance(principal, Principal) else Principal.parse(principal)
    return f"{principal} {key_id} {hash_key(key)}"


def parse_key_lines(text: str, *, source: str) -> list[StoredKey]:
    """`<principal> <key id> sha256$<salt>$<digest>` per line (or per `;`); `#` comments."""
    entries = []
    for number, raw in enumerate(re.split(r"[\n;]", text), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise KeyConfigError(
                f"{source}, entry {number}: expected '<principal> <key id> sha256$<salt>$<digest>'"
            )
        try:
            principal = Principal.parse(parts[0])
        except ValueError as err:
            raise KeyConfigError(f"{source}, entry {number}: {err}") from None
        hashed = _HASH.fullmatch(parts[2])
        if not re.fullmatch(r"[0-9a-f]{16}", parts[1]) or hashed is None:
            raise KeyConfigError(
                f"{source}, entry {number}: malformed key id or hash (a placeholder? make"
                " real keys with `ordercancel api hash-key`)"
            )
        entries.append(
            StoredKey(
                principal=principal,
                key_id=parts[1],
                salt=bytes.fromhex(hashed.group(1)),
                digest=bytes.fromhex(hashed.group(2)),
            )
        )
    return entries


class KeyStore:
    """The configured keys by key id. `authenticate` costs one hash and one constant-time
    comparison, also for an unknown key id, so timing does not tell which ids exist."""

    _DUMMY = StoredKey(Principal(Role.SRE), "0" * 16, b"\0" * 16, b"\0" * 32)

    def __init__(self, entries: Iterable[StoredKey]) -> None:
        self._by_id: dict[str, StoredKey] = {}
        for entry in entries:
            if entry.key_id in self._by_id:
                raise KeyConfigError(f"key id {entry.key_id} is configured twice")
            self._by_id[entry.key_id] = entry

    @classmethod
    def load(cls, *, file: Path | None, env_value: str | None) -> KeyStore:
        entries: list[StoredKey] = []
        if file is not None:
            try:
                text = file.read_text()
            except OSError as err:
                raise KeyConfigError(f"cannot read the API keys file {file}: {err}") from None
            entries += parse_key_lines(text, source=str(file))
        if env_value:
            entries += parse_key_lines(env_value, source="ORDERCANCEL_API_KEYS")
        return cls(entries)

    @classmethod
    def from_keys(cls, keys: Mapping[str, str]) -> KeyStore:
        """Hash plaintext keys (principal -> key) in memory: dev and tests."""
        return cls(parse_key_lines("\n".join(key_line(p, k) for p, k in keys.items()), source="-"))

    def __len__(self) -> int:
        return len(self._by_id)

    def has_key_id(self, key_id: str) -> bool:
        return key_id in self._by_id

    def authenticate(self, key: str) -> Principal | None:
        key_id = key_id_of(key)
        entry = self._by_id.get(key_id) if key_id is not None else None
        candidate = entry or self._DUMMY
        matches = hmac.compare_digest(_digest(candidate.salt, key), candidate.digest)
        return entry.principal if entry is not None and matches else None
