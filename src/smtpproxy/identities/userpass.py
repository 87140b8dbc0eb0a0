"""The C{userpass} backend: users listed in the file, passwords as bcrypt hashes.

C{params.users} lists C{{username, password_hash}} entries (C{$2b$}
hashes from C{smtpproxy passwd}; an entry may add a C{policy} of its
own).  esmtpfa's single C{username}/C{password} pair works too, but the
password must then come from the environment (C{${VAR}}): no plaintext
password is ever read from the file.

bcrypt is slow on purpose (0.25 to 0.8 s at cost 12, by CPU and load), so it runs
in threads and the relay keeps serving while it works: a small pool of
its own (L{smtpproxy.identities.hashpool}), never the reactor's, which
also resolves host names.  When that pool and its wait list are full the
login is L{BackendUnavailable} (C{454}, not counted: nothing was tested).
An unknown user costs one bcrypt against a dummy hash, the same as a
wrong password, so timing does not tell which names exist; it is refused
as L{NoSuchUser}, which only the router tells apart (see
L{smtpproxy.identities.router}).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

import bcrypt
from twisted.cred import error
from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore
from twisted.python.failure import Failure

from smtpproxy.identities.errors import BackendUnavailable, IdentityConfigError, NoSuchUser
from smtpproxy.identities.fileformat import ProviderEntry, is_reference
from smtpproxy.identities.hashpool import HashPool, PoolBusy
from smtpproxy.identities.model import Verified
from smtpproxy.policy.identity import IdentityPolicy, parse_policy

_PREFIXES = (b"$2b$", b"$2a$", b"$2y$")
_USER_KEYS = ("username", "password_hash", "policy")
# bcrypt only reads the first 72 bytes; longer passwords are refused
# rather than silently truncated (two passwords sharing 72 bytes would match).
MAX_PASSWORD_BYTES = 72


@dataclass(frozen=True, slots=True)
class _User:
    password_hash: bytes
    policy: IdentityPolicy | None


def hash_password(password: str, rounds: int = 12) -> str:
    """A C{$2b$} hash of C{password} (for C{smtpproxy passwd})."""
    data = password.encode("utf-8")
    if len(data) > MAX_PASSWORD_BYTES:
        raise ValueError(f"longer than {MAX_PASSWORD_BYTES} bytes (bcrypt's limit)")
    return bcrypt.hashpw(data, bcrypt.gensalt(rounds)).decode("ascii")


def _valid_hash(value: object) -> bytes | None:
    if not isinstance(value, str):
        return None
    data = value.encode("ascii", "replace")
    if not data.startswith(_PREFIXES) or len(data) != 60:
        return None
    return data


class UserpassBackend:
    """Checks user names and passwords against the file's bcrypt hashes."""

    def __init__(
        self,
        entry: ProviderEntry,
        reactor: IReactorCore,
        pool: HashPool | None = None,
    ) -> None:
        """@param pool: where bcrypt runs (by default a L{HashPool} of this backend's own)."""
        self.name = entry.name
        self._hashing = pool if pool is not None else HashPool(reactor, name=f"bcrypt-{entry.name}")
        self._users: dict[str, _User] = {}
        self._plain: tuple[str, bytes] | None = None
        params = entry.params
        where = f"provider {entry.name!r}.params"
        unknown = sorted(set(params) - {"users", "username", "password", "password_hash"})
        if unknown:
            raise IdentityConfigError(f"{where}: unknown key {unknown[0]!r}")
        users = params.get("users") or []
        if not isinstance(users, list):
            raise IdentityConfigError(f"{where}.users: a list of {{username, password_hash}}")
        for i, raw in enumerate(users):
            self._add_user(raw, f"{where}.users[{i}]", entry.policy)
        if "username" in params:
            self._single(params, entry.written, where, entry.policy)
        if not self._users and self._plain is None:
            raise IdentityConfigError(f"{where}: needs users, or username with a password")
        # The dummy hash for unknown users: same cost as the real ones.
        rounds = next(iter(self._users.values())).password_hash[4:6] if self._users else b"12"
        self._dummy = bcrypt.hashpw(b"no such user", bcrypt.gensalt(int(rounds)))

    def mailboxes(self) -> tuple[tuple[str, str], ...]:
        """C{(where, mailbox)} for each user whose own policy names a mailbox (start-up check)."""
        return tuple(
            (f"provider {self.name!r} user {username!r}", user.policy.mailbox)
            for username, user in self._users.items()
            if user.policy is not None and user.policy.mailbox
        )

    def _add_user(self, raw: object, where: str, base: IdentityPolicy) -> None:
        if not isinstance(raw, dict):
            raise IdentityConfigError(f"{where}: a mapping with username and password_hash")
        unknown = sorted(set(map(str, raw)) - set(_USER_KEYS))
        if unknown:
            hint = " (store a hash: smtpproxy passwd)" if "password" in unknown else ""
            raise IdentityConfigError(f"{where}: unknown key {unknown[0]!r}{hint}")
        username = raw.get("username")
        if not isinstance(username, str) or not username:
            raise IdentityConfigError(f"{where}.username: required")
        hashed = _valid_hash(raw.get("password_hash"))
        if hashed is None:
            raise IdentityConfigError(
                f"{where}.password_hash: a bcrypt hash ($2b$..., 60 characters; "
                "make one with: smtpproxy passwd)"
            )
        if username in self._users:
            raise IdentityConfigError(f"{where}.username: {username!r} is listed twice")
        policy = None
        if raw.get("policy") is not None:
            if not isinstance(raw["policy"], dict):
                raise IdentityConfigError(f"{where}.policy: must be a mapping")
            try:
                policy = parse_policy(raw["policy"], base)
            except ValueError as e:
                raise IdentityConfigError(f"{where}.policy: {e}") from None
        self._users[username] = _User(hashed, policy)

    def _single(
        self,
        params: Mapping[str, object],
        raw_params: Mapping[str, object],
        where: str,
        base: IdentityPolicy,
    ) -> None:
        username = params.get("username")
        if not isinstance(username, str) or not username:
            raise IdentityConfigError(f"{where}.username: a non-empty text")
        if "password_hash" in params:
            self._add_user(
                {"username": username, "password_hash": params["password_hash"]}, where, base
            )
            return
        password, written = params.get("password"), raw_params.get("password")
        if not isinstance(password, str) or not password:
            raise IdentityConfigError(f"{where}.password: required (or password_hash)")
        if not (isinstance(written, str) and is_reference(written)):
            raise IdentityConfigError(
                f"{where}.password: must be ${{VAR}} from the environment, never the password "
                "itself; or store a password_hash (smtpproxy passwd)"
            )
        self._plain = (username, hashlib.sha256(password.encode("utf-8")).digest())

    @property
    def usernames(self) -> tuple[str, ...]:
        """The listed user names (they may appear in the log of a failed login)."""
        plain = (self._plain[0],) if self._plain is not None else ()
        return (*self._users, *plain)

    def close(self) -> None:
        """Stop the bcrypt threads (at shutdown); checks still waiting are unavailable."""
        self._hashing.close()

    def check(self, user: str, secret: str) -> defer.Deferred[Verified]:
        password = secret.encode("utf-8", "surrogatepass")
        if self._plain is not None and user == self._plain[0]:
            # From the environment, compared as digests: constant time
            # whatever the lengths.
            digest = hashlib.sha256(password).digest()
            if hmac.compare_digest(digest, self._plain[1]):
                return defer.succeed(Verified(user))
            return defer.fail(error.UnauthorizedLogin("wrong password"))
        found = self._users.get(user)
        stored = found.password_hash if found is not None else self._dummy
        too_long = len(password) > MAX_PASSWORD_BYTES
        if too_long:
            # Refused whatever the stored hash says (it may be a hash of ""),
            # but still hashed against the dummy: the answer takes as long as
            # any other, and says nothing about which part was wrong.
            password, stored = b"", self._dummy

        def compare() -> bool:
            return bcrypt.checkpw(password, stored)

        def answer(good: bool) -> Verified:
            if found is None:
                raise NoSuchUser("no such user")
            if good and secret and not too_long:
                return Verified(user, found.policy)
            raise error.UnauthorizedLogin("wrong password")

        def busy(failure: Failure) -> Verified | Failure:
            if not isinstance(failure.value, PoolBusy):
                return failure
            raise BackendUnavailable(self.name, f"password checks busy: {failure.value}")

        return self._hashing.run(compare).addCallbacks(answer, busy)
