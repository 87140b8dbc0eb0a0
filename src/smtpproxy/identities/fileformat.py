"""The C{AUTH_CONFIG} file: identity providers in esmtpfa's shape, checked up front.

The file is YAML or JSON (JSON is YAML) with a C{providers} list (a bare
list is accepted too).  Each entry has C{meta} (C{name}, C{type},
C{domain}, C{fallback}, C{unique_domain_auth}), C{params} for its backend
and an optional C{policy} (L{smtpproxy.policy.identity}).  Any string value
may hold C{${VAR}} references, replaced with the environment's value; a
variable that is not set stops start-up with one line naming it, since a
credential silently left empty is worse than no start.

Everything here is pure: text and an environment mapping in, values out,
so every rule is tested without files.  The backend modules check their
own C{params} (L{smtpproxy.identities.build}).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

from smtpproxy.addresses import is_hostname
from smtpproxy.identities.errors import IdentityConfigError
from smtpproxy.policy.identity import UNRESTRICTED, IdentityPolicy, parse_policy

TYPES = ("userpass", "http_basic", "http_header", "jwt", "ldap")
# Types whose check needs a user name and a secret: selected by provider
# name, their password field carries "user:secret".  The others take one
# token, the password field as it is.
NEEDS_USER = frozenset({"userpass", "http_basic", "ldap"})
_META_KEYS = ("name", "type", "domain", "fallback", "unique_domain_auth")
_ENTRY_KEYS = ("meta", "params", "policy")
_CACHE_KEYS = ("seconds", "max_entries")
# A bound on the file: it is operator input, but a file ten megabytes
# long is a mistake (a wrong path), not a configuration.
MAX_FILE_CHARS = 4_000_000


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """One provider as the file describes it, C{${VAR}} already replaced."""

    name: str
    type: str
    params: Mapping[str, object]
    domain: str = ""
    fallback: bool = False
    unique_domain_auth: bool = False
    policy: IdentityPolicy = UNRESTRICTED
    # The params as written, before ${VAR} replacement: a backend can tell
    # a secret read from the environment from one typed into the file.
    written: Mapping[str, object] = field(default_factory=dict)

    @property
    def needs_user(self) -> bool:
        return self.type in NEEDS_USER


@dataclass(frozen=True, slots=True)
class IdentityFile:
    """The whole file: the providers in order, and how long a yes may be cached.

    @ivar cache_seconds: how long a successful check is remembered (0: never).
    @ivar cache_max_entries: the most remembered at once.
    """

    providers: tuple[ProviderEntry, ...]
    cache_seconds: float = 0.0
    cache_max_entries: int = 10_000
    names: frozenset[str] = field(default=frozenset())


def expand(text: str, env: Mapping[str, str], where: str) -> str:
    """Replace each C{${VAR}} in C{text} with the environment's value.

    One left-to-right pass with C{str.find}: linear, and a value is never
    expanded again (an environment value holding C{${X}} stays as it is).

    @raise IdentityConfigError: a variable is not set, or a C{${} is not closed.
    """
    if "${" not in text:
        return text
    out: list[str] = []
    position = 0
    while True:
        start = text.find("${", position)
        if start < 0:
            out.append(text[position:])
            return "".join(out)
        end = text.find("}", start + 2)
        if end < 0:
            raise IdentityConfigError(f"{where}: '${{' without a closing '}}'")
        name = text[start + 2 : end]
        if not name or not all(c.isalnum() or c == "_" for c in name):
            raise IdentityConfigError(f"{where}: {name!r} is not an environment variable name")
        if name not in env:
            raise IdentityConfigError(f"{where}: environment variable {name} is not set")
        out.append(text[position:start])
        out.append(env[name])
        position = end + 1


def is_reference(text: str) -> bool:
    """Is C{text} exactly one C{${VAR}} reference (a secret kept out of the file)?"""
    return text.startswith("${") and text.endswith("}") and text.count("}") == 1


def _expand_all(value: object, env: Mapping[str, str], where: str) -> object:
    if isinstance(value, str):
        return expand(value, env, where)
    if isinstance(value, list):
        return [_expand_all(item, env, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _expand_all(v, env, f"{where}.{k}") for k, v in value.items()}
    return value


def _mapping(value: object, where: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise IdentityConfigError(f"{where}: must be a mapping")
    return {str(k): v for k, v in value.items()}


def _flag(meta: Mapping[str, object], key: str, where: str) -> bool:
    value = meta.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise IdentityConfigError(f"{where}.meta.{key}: true or false")
    return value


def _entry(raw: object, index: int, env: Mapping[str, str]) -> ProviderEntry:
    where = f"providers[{index}]"
    body = _mapping(raw, where)
    unknown = sorted(set(body) - set(_ENTRY_KEYS))
    if unknown:
        raise IdentityConfigError(
            f"{where}: unknown key {unknown[0]!r}; known: meta, params, policy"
        )
    meta = _mapping(body.get("meta"), f"{where}.meta")
    extra = sorted(set(meta) - set(_META_KEYS))
    if extra:
        raise IdentityConfigError(f"{where}.meta: unknown key {extra[0]!r}")
    name = meta.get("name")
    if not isinstance(name, str) or not name.strip():
        raise IdentityConfigError(f"{where}.meta.name: required, a non-empty text")
    if ":" in name or any(c.isspace() for c in name):
        raise IdentityConfigError(f"{where}.meta.name: {name!r} may not hold ':' or spaces")
    where = f"provider {name!r}"
    kind = meta.get("type")
    if kind not in TYPES:
        raise IdentityConfigError(f"{where}: meta.type must be one of {', '.join(TYPES)}")
    domain = meta.get("domain") or ""
    if not isinstance(domain, str) or (domain and not is_hostname(domain)):
        raise IdentityConfigError(f"{where}: meta.domain {domain!r} is not a host name")
    unique = _flag(meta, "unique_domain_auth", where)
    if unique and not domain:
        raise IdentityConfigError(f"{where}: unique_domain_auth needs meta.domain")
    written = _mapping(body.get("params"), f"{where}.params")
    params = _expand_all(written, env, f"{where}.params")
    assert isinstance(params, dict)
    try:
        policy = parse_policy(_mapping(body.get("policy"), f"{where}.policy"))
    except ValueError as e:
        raise IdentityConfigError(f"{where}.policy: {e}") from None
    return ProviderEntry(
        name=name,
        type=str(kind),
        params=params,
        domain=domain.lower().rstrip("."),
        fallback=_flag(meta, "fallback", where),
        unique_domain_auth=unique,
        policy=policy,
        written=written,
    )


def parse(text: str, env: Mapping[str, str], source: str = "AUTH_CONFIG") -> IdentityFile:
    """Parse and check the identity file's C{text}.

    @raise IdentityConfigError: one line naming the place that is wrong.
    """
    if len(text) > MAX_FILE_CHARS:
        raise IdentityConfigError(f"{source}: longer than {MAX_FILE_CHARS} characters")
    try:
        # JSON first (exact errors for JSON files); YAML reads the rest.
        document: object = json.loads(text) if text.lstrip().startswith(("{", "[")) else None
    except ValueError:
        document = None
    if document is None:
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise IdentityConfigError(f"{source}: not valid YAML or JSON{at}") from None
    cache: dict[str, object] = {}
    if isinstance(document, dict):
        unknown = sorted(set(map(str, document)) - {"providers", "cache"})
        if unknown:
            raise IdentityConfigError(
                f"{source}: unknown key {unknown[0]!r}; known: providers, cache"
            )
        cache = _mapping(document.get("cache"), f"{source}: cache")
        document = document.get("providers")
    if not isinstance(document, list) or not document:
        raise IdentityConfigError(f"{source}: needs a non-empty providers list")
    entries = tuple(_entry(raw, i, env) for i, raw in enumerate(document))
    names = [e.name for e in entries]
    for name in names:
        if names.count(name) > 1:
            raise IdentityConfigError(f"{source}: provider name {name!r} is used twice")
    domains = [e.domain for e in entries if e.unique_domain_auth]
    for domain in domains:
        if domains.count(domain) > 1:
            raise IdentityConfigError(
                f"{source}: two providers claim domain {domain!r} with unique_domain_auth"
            )
    seconds, max_entries = _cache(cache, source)
    return IdentityFile(entries, seconds, max_entries, frozenset(names))


def _cache(raw: Mapping[str, object], source: str) -> tuple[float, int]:
    unknown = sorted(set(raw) - set(_CACHE_KEYS))
    if unknown:
        raise IdentityConfigError(f"{source}: cache: unknown key {unknown[0]!r}")
    seconds = raw.get("seconds", 0)
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 <= seconds <= 3600
    ):
        raise IdentityConfigError(f"{source}: cache.seconds: a number from 0 to 3600")
    entries = raw.get("max_entries", 10_000)
    if isinstance(entries, bool) or not isinstance(entries, int) or not 1 <= entries <= 1_000_000:
        raise IdentityConfigError(f"{source}: cache.max_entries: a whole number from 1 to 1000000")
    return float(seconds), entries
