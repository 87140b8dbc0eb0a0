"""Reading one backend's C{params}: typed values or one line naming the key that is wrong."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from smtpproxy.identities.errors import IdentityConfigError

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class Params:
    """A provider's C{params} with typed getters; unknown keys are refused."""

    def __init__(self, provider: str, params: Mapping[str, object], known: Sequence[str]) -> None:
        self.where = f"provider {provider!r}.params"
        self.values = params
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise IdentityConfigError(
                f"{self.where}: unknown key {unknown[0]!r}; known: {', '.join(known)}"
            )

    def error(self, key: str, problem: str) -> IdentityConfigError:
        return IdentityConfigError(f"{self.where}.{key}: {problem}")

    def text(self, key: str, default: str | None = None) -> str:
        value = self.values.get(key, default)
        if value is None:
            raise self.error(key, "required")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.error(key, "must be text")
        return str(value)

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.values.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise self.error(key, f"a number from {low:g} to {high:g}")
        return float(value)

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.values.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"a whole number from {low} to {high}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.values.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, "true or false")
        return value

    def codes(self, key: str) -> frozenset[int]:
        value = self.values.get(key, [200])
        if not isinstance(value, list) or not value:
            raise self.error(key, "a list of HTTP status codes")
        for code in value:
            if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
                raise self.error(key, f"{code!r} is not an HTTP status code")
        return frozenset(value)

    def strings(self, key: str, default: Sequence[str] = ()) -> tuple[str, ...]:
        value = self.values.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "a list of texts")
        return tuple(value)

    def file(self, key: str) -> str:
        """A path to a readable file, or empty when the key is not given."""
        path = self.text(key, "")
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise self.error(
                    key, f"cannot read {path}: {(e.strerror or str(e)).lower()}"
                ) from None
        return path

    def url(self, key: str) -> str:
        """An https URL, or http to this host only (a sidecar): secrets travel in it."""
        url = self.text(key)
        parts = urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            return url
        if parts.scheme == "http" and parts.hostname in _LOOPBACK:
            return url
        raise self.error(key, f"{url!r}: https:// (http:// only to localhost)")
