"""API keys: where they come from, what each may do, and the constant-time lookup.

Two sources, both pure text here (the caller reads files): C{HTTP_API_KEYS},
comma-separated C{id:secret} pairs, and C{HTTP_API_KEYS_FILE}, a YAML list
of keys that names each secret only by its SHA-256 digest, with a policy
per key.  Secrets from the environment are hashed as soon as they are
read: nothing here keeps a secret, only its digest, so no repr, log line or
traceback can show one.

A lookup hashes the presented secret and compares that digest with every
key's digest with L{hmac.compare_digest}, always all of them: neither the
position of the matching key nor the length or prefix of a wrong secret
changes the work done, so response times tell an attacker nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

from smtpproxy.addresses import mailbox_problem
from smtpproxy.policy import rules

__all__ = [
    "MIN_SECRET_LENGTH",
    "ApiKey",
    "KeyRing",
    "digest",
    "parse_env_keys",
    "parse_keys_file",
]

#: Characters a secret from C{HTTP_API_KEYS} must have at least: 32 random
#: characters are out of reach of guessing at any request rate.
MIN_SECRET_LENGTH = 32

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_FILE_FIELDS = frozenset(
    {
        "id",
        "secret_sha256",
        "enabled",
        "allowed_senders",
        "allowed_recipients",
        "allowed_networks",
        "rate_limit_per_min",
        "mailbox",
    }
)
_ANY = rules.AddressPatterns()


def digest(secret: str | bytes) -> bytes:
    """The SHA-256 digest a secret is stored and compared as."""
    data = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key: its id (for logs and policy), its digest and what it may do.

    @ivar rate_limit_per_min: this key's own limit; None takes
        C{HTTP_API_RATE_LIMIT_PER_KEY}.
    @ivar allowed_networks: client networks this key may be used from;
        empty means any (the listener's own network rule still applies).
    @ivar mailbox: the sending mailbox (one of C{GRAPH_SENDER}) this key's
        messages go out as, as an identity's policy C{mailbox}; empty for
        the provider's own choice.
    """

    id: str
    secret_digest: bytes
    enabled: bool = True
    allowed_senders: rules.AddressPatterns = _ANY
    allowed_recipients: rules.AddressPatterns = _ANY
    allowed_networks: rules.Networks = ()
    rate_limit_per_min: int | None = None
    mailbox: str = ""

    def __repr__(self) -> str:
        # The digest is no secret, but nothing about a key needs to be in a log.
        return f"ApiKey(id={self.id!r}, enabled={self.enabled})"


class KeyRing:
    """The keys in force; replaced as a whole when the file is read again (SIGHUP)."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys: tuple[ApiKey, ...] = tuple(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, presented: str | bytes) -> ApiKey | None:
        """The enabled key whose secret is C{presented}, or None.

        Every key's digest is compared, whatever matched before: the loop
        has no early exit and the comparison sees two 32-byte digests, so
        the work is the same for the first key, the last one and a guess.
        A disabled key is found like any other and then refused, so it
        costs the same as an enabled one.
        """
        wanted = digest(presented)
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(wanted, key.secret_digest) and found is None:
                found = key
        if found is None or not found.enabled:
            return None
        return found


def _check_id(key_id: str, seen: set[str], where: str) -> None:
    if not _ID.fullmatch(key_id):
        raise ValueError(
            f"{where}: a key id is 1-64 letters, digits, dots, dashes or underscores, "
            "starting with a letter or digit"
        )
    if key_id in seen:
        raise ValueError(f"{where}: key id {key_id!r} is used twice")
    seen.add(key_id)


def parse_env_keys(text: str) -> tuple[ApiKey, ...]:
    """C{HTTP_API_KEYS}: C{id:secret[,id:secret...]}; empty text gives no keys.

    @raise ValueError: for a pair without a colon, a bad or repeated id, or a
        secret shorter than L{MIN_SECRET_LENGTH} (never quoting the secret).
    """
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for number, item in enumerate((part.strip() for part in text.split(",")), 1):
        if not item:
            continue
        key_id, sep, secret = item.partition(":")
        where = f"key {number}"
        if not sep:
            raise ValueError(f"{where}: expected id:secret")
        _check_id(key_id.strip(), seen, where)
        if len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"key {key_id.strip()!r}: the secret has {len(secret)} characters; "
                f"at least {MIN_SECRET_LENGTH} are required"
            )
        keys.append(ApiKey(key_id.strip(), digest(secret)))
    return tuple(keys)


def parse_keys_file(text: str, source: str = "HTTP_API_KEYS_FILE") -> tuple[ApiKey, ...]:
    """The keys in a keys file: a YAML list of mappings (see docs/http-api.md).

    Unknown fields are errors, not typos to ignore: a misspelt
    C{allowed_recipient} would otherwise silently allow every recipient.

    @raise ValueError: naming the entry and the field that is wrong.
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"{source}: not valid YAML") from None
    if document is None:
        return ()
    if not isinstance(document, list):
        raise ValueError(f"{source}: expected a list of keys")
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for number, entry in enumerate(document, 1):
        where = f"{source}: key {number}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping")
        unknown = sorted(str(name) for name in entry if name not in _FILE_FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}")
        key_id = entry.get("id")
        if not isinstance(key_id, str):
            raise ValueError(f"{where}: id is required (text)")
        _check_id(key_id, seen, where)
        where = f"{source}: key {key_id!r}"
        hexed = entry.get("secret_sha256")
        if not isinstance(hexed, str) or not _HEX_DIGEST.fullmatch(hexed):
            raise ValueError(f"{where}: secret_sha256 must be 64 hexadecimal digits")
        enabled = entry.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"{where}: enabled must be true or false")
        rate = entry.get("rate_limit_per_min")
        if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or rate < 0):
            raise ValueError(f"{where}: rate_limit_per_min must be a whole number, 0 or more")
        mailbox = entry.get("mailbox", "")
        if not isinstance(mailbox, str) or (mailbox and mailbox_problem(mailbox) is not None):
            raise ValueError(f"{where}: mailbox must be an address")
        try:
            senders = rules.parse_address_patterns(_joined(entry, "allowed_senders"))
            recipients = rules.parse_address_patterns(_joined(entry, "allowed_recipients"))
            networks = rules.parse_networks(_joined(entry, "allowed_networks"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        keys.append(
            ApiKey(
                key_id,
                bytes.fromhex(hexed),
                enabled,
                senders,
                recipients,
                networks,
                rate,
                mailbox,
            )
        )
    return tuple(keys)


def _joined(entry: dict[object, object], name: str) -> str:
    """A list field (or one text value) as the comma-separated text the policy parsers read."""
    value = entry.get(name)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    raise ValueError(f"{name} must be a list of text values")
