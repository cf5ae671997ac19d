"""API keys -> tenants. Keys are kept only as SHA-256 hashes.

Sources: a JSON file (`--api-keys FILE`: [{"tenant": "alice", "key_sha256": "..."}])
and the environment (PARROT_API_KEYS="alice=key1,bob=key2", hashed on load).
Engines authenticate with the engine key (PARROT_ENGINE_KEY), never a tenant's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from parrot.errors import UserError

SHA256_HEX = re.compile("[0-9a-f]{64}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    tenant: str
    is_engine: bool = False


class KeyStore:
    def __init__(self, tenant_hashes: dict[str, str], engine_key_hash: str):
        self._tenants = dict(tenant_hashes)  # key hash -> tenant
        self._engine_hash = engine_key_hash

    @classmethod
    def load(cls, path: str | None = None, env: dict[str, str] | None = None, engine_key: str | None = None) -> "KeyStore":
        env = dict(os.environ) if env is None else env
        hashes: dict[str, str] = {}
        if path:
            try:
                entries = json.loads(Path(path).read_text())
                for entry in entries:
                    hashes[str(entry["key_sha256"]).lower()] = str(entry["tenant"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"cannot read API keys from {path}: {exc}; expected a JSON list of {{\"tenant\", \"key_sha256\"}}") from exc
            if not hashes:
                # a file given and empty would otherwise fall back to a key made up for the run
                raise UserError(f"{path} lists no API keys: add {{\"tenant\", \"key_sha256\"}} entries, or leave --api-keys out")
            malformed = [digest for digest in hashes if not SHA256_HEX.fullmatch(digest)]
            if malformed:
                raise UserError(f"{path}: {malformed[0]!r} is no key_sha256: give the 64 hex digits of the key's SHA-256 "
                                "(python -c \"import hashlib; print(hashlib.sha256(b'KEY').hexdigest())\")")
        for pair in filter(None, (p.strip() for p in env.get("PARROT_API_KEYS", "").split(","))):
            tenant, sep, key = pair.partition("=")
            if not sep or not tenant or not key:
                raise UserError("PARROT_API_KEYS must look like 'tenant=key,tenant2=key2'")
            hashes[hash_key(key)] = tenant
        engine_key = engine_key or env.get("PARROT_ENGINE_KEY") or secrets.token_urlsafe(24)
        return cls(hashes, hash_key(engine_key))

    @property
    def empty(self) -> bool:
        return not self._tenants

    def add(self, tenant: str, key: str) -> None:
        self._tenants[hash_key(key)] = tenant

    def authenticate(self, key: str | None) -> Principal | None:
        if not key:
            return None
        digest = hash_key(key)
        if hmac.compare_digest(digest, self._engine_hash):
            return Principal("__engines__", is_engine=True)
        tenant = self._tenants.get(digest)
        return Principal(tenant) if tenant is not None else None
