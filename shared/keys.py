"""Bearer API keys, stored as SHA-256 hashes (keys are random, so a plain hash is enough): the
keys file both parties' HTTP services read.

Keys file: one key per line, ``sha256:<hex> [name] [tokens_per_minute=N]``; ``#`` starts a
comment. Make a line with ``pema-server hash-key``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from pathlib import Path

KEY_PREFIX = "pema_"
OPTIONS = ("tokens_per_minute",)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeysFile:
    """The owners of key hashes, and each owner's options (``tokens_per_minute``)."""

    owners: dict[str, str]  # key hash -> owner name
    quotas: dict[str, int] = field(default_factory=dict)  # owner name -> tokens per minute

    @classmethod
    def read(cls, path: Path) -> KeysFile:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {path}: {exc}") from exc
        owners: dict[str, str] = {}
        quotas: dict[str, int] = {}
        for number, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            digest, options = fields[0], [f for f in fields[1:] if "=" in f]
            names = [f for f in fields[1:] if "=" not in f]
            if not (digest.startswith("sha256:") and len(digest) == 71) or len(names) > 1:
                raise ValueError(
                    f"{path}:{number}: expected 'sha256:<64 hex digits> [name] "
                    "[tokens_per_minute=N]'; make one with `pema-server hash-key`"
                )
            name = owners[digest] = names[0] if names else f"key-{digest[7:15]}"
            for option in options:
                key, _, value = option.partition("=")
                if key not in OPTIONS or not value.isdigit() or int(value) < 1:
                    raise ValueError(
                        f"{path}:{number}: unknown option {option!r}; the one option is "
                        "tokens_per_minute=N with N ≥ 1"
                    )
                quotas[name] = int(value)
        if not owners:
            raise ValueError(f"the API keys file {path} holds no keys")
        return cls(owners, quotas)

    def owner_of(self, key: str) -> str | None:
        """The owner of a presented key, or None; every entry is compared in constant time."""
        digest, owner = hash_key(key), None
        for stored, name in self.owners.items():
            if hmac.compare_digest(stored, digest):
                owner = name
        return owner


def bearer_key(authorization: str) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header's value, or None."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (no keys needed there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_exposure(host: str, *, keyed: bool, insecure_no_auth: bool, exposed: str) -> None:
    """Refuse to serve ``host`` beyond loopback without keys, unless the owner asked for it;
    ``exposed`` names what anyone who reaches it could use."""
    if keyed or insecure_no_auth or is_loopback(host):
        return
    raise ValueError(
        f"refusing to serve {host} without API keys: anyone who reaches it could use {exposed}. "
        "Make keys with `pema-server hash-key --name NAME >> keys.txt` and pass "
        "--api-keys-file keys.txt, or bind 127.0.0.1, or pass --insecure-no-auth"
    )
