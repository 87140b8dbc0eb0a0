"""The C{ldap} backend, with ldaptor: find the user's entry, then bind as it.

Per login: connect (LDAPS, or plain LDAP upgraded with StartTLS; never
unencrypted), bind as the service account, search C{base_dn} for the
configured filter with the user name escaped (L{ldapfilter}), require
exactly one entry, then bind as that entry's DN with the client's
password.  The server's certificate and host name are verified.

An empty password is refused before the server is asked: LDAP treats a
bind with a DN and no password as an anonymous ("unauthenticated") bind,
which many servers accept.  Wrong password, no entry or several entries
is C{UnauthorizedLogin} (no entry or several: L{NoSuchUser}, as no
password was tried); anything that stops the question being asked
(connection, TLS, the service bind, a timeout) is L{BackendUnavailable}.

The identity is named after the entry the directory found, not after the
name as typed: the directory matches C{uid} without case and ignoring
extra spaces, so C{alice}, C{ALICE} and C{Alice } are one entry and must
be one identity (one rate budget, one name in the log).  The search asks
for the attribute the filter compares the user name with (L{user_attribute})
and the identity takes its stored value; without one such attribute, or
when the value is unusable (too long, not printable), the entry's DN.
"""

from __future__ import annotations

from ldaptor import ldapfilter as ldaptor_filter
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldaperrors
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.cred import error
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.python.failure import Failure

from smtpproxy.identities.errors import BackendUnavailable, NoSuchUser
from smtpproxy.identities.fileformat import ProviderEntry
from smtpproxy.identities.ldapfilter import MAX_USER_CHARS, PLACEHOLDER, user_filter
from smtpproxy.identities.model import Verified
from smtpproxy.identities.params import Params
from smtpproxy.identities.tlsclient import client_certificate, trust_root

_KNOWN = (
    "server",
    "port",
    "enable_tls",
    "tls_mode",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tls_insecure_skip_verify",
    "bind_user",
    "bind_pass",
    "base_dn",
    "filter_string",
    "attributes",
    "timeout",
)


class LDAPBackend:
    """One directory server; a new connection per check (logins are rare, and cached)."""

    def __init__(self, entry: ProviderEntry, reactor: IReactorTime) -> None:
        p = Params(entry.name, entry.params, _KNOWN)
        self.name = entry.name
        self.server = p.text("server")
        self.port = p.integer("port", 636, 1, 65535)
        if not p.flag("enable_tls", True):
            raise p.error(
                "enable_tls", "passwords never go to LDAP unencrypted; use LDAPS or StartTLS"
            )
        if p.flag("tls_insecure_skip_verify", False):
            raise p.error("tls_insecure_skip_verify", "not supported; give the CA in tls_ca")
        default_mode = "ldaps" if self.port == 636 else "starttls"
        self.mode = p.text("tls_mode", default_mode)
        if self.mode not in ("ldaps", "starttls"):
            raise p.error("tls_mode", "ldaps or starttls")
        self.bind_user = p.text("bind_user", "")
        self.bind_pass = p.text("bind_pass", "")
        self.base_dn = p.text("base_dn")
        self.template = p.text("filter_string", "(&(objectClass=person)(uid=%s))")
        if PLACEHOLDER not in self.template:
            raise p.error("filter_string", "needs %s where the user name goes")
        try:
            ldaptor_filter.parseFilter(user_filter(self.template, "probe"))
        except Exception:
            raise p.error("filter_string", f"{self.template!r} is not an LDAP filter") from None
        p.strings("attributes")  # esmtpfa's; the filter says which attribute names the user
        self.attribute = user_attribute(self.template)
        self.timeout = p.number("timeout", 10.0, 0.1, 120.0)
        self._tls = ssl.optionsForClientTLS(
            self.server,
            trustRoot=trust_root(p.file("tls_ca"), p.where + ".tls_ca"),
            clientCertificate=client_certificate(
                p.file("tls_cert"), p.file("tls_key"), p.where + ".tls_cert"
            ),
        )
        self._reactor = reactor

    def check(self, user: str, secret: str) -> defer.Deferred[Verified]:
        if not user or not secret or len(user) > MAX_USER_CHARS or "\x00" in user:
            return defer.fail(error.UnauthorizedLogin("no user name or password"))
        asking = defer.Deferred.fromCoroutine(self._check(user, secret))
        return asking.addTimeout(self.timeout, self._reactor, self._timed_out)

    def _timed_out(self, result: Verified | Failure, timeout: float) -> Verified | Failure:
        raise BackendUnavailable(self.name, f"no answer within {timeout:g} s")

    async def _connect(self) -> LDAPClient:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self._reactor, self.server, self.port)
        if self.mode == "ldaps":
            endpoint = wrapClientTLS(self._tls, endpoint)
        client: LDAPClient = await connectProtocol(endpoint, LDAPClient())
        if self.mode == "starttls":
            await client.startTLS(self._tls)
        return client

    async def _check(self, user: str, secret: str) -> Verified:
        try:
            client = await self._connect()
        except defer.CancelledError:
            raise
        except Exception as e:
            raise BackendUnavailable(self.name, f"cannot connect: {_describe(e)}") from None
        try:
            return await self._ask(client, user, secret)
        finally:
            if client.transport is not None:
                client.transport.loseConnection()

    async def _ask(self, client: LDAPClient, user: str, secret: str) -> Verified:
        try:
            await client.bind(self.bind_user, self.bind_pass)
            found = await _search(
                client, self.base_dn, user_filter(self.template, user), self.attribute
            )
        except defer.CancelledError:
            raise
        except Exception as e:
            # The service account or the search failing is our problem,
            # not the client's: never a 535.
            raise BackendUnavailable(self.name, f"search failed: {_describe(e)}") from None
        if len(found) != 1:
            # No password was tried: the name may belong to another backend.
            raise NoSuchUser("no single entry for this user")
        dn, values = found[0]
        try:
            await client.bind(dn, secret)
        except ldaperrors.LDAPInvalidCredentials:
            raise error.UnauthorizedLogin("wrong password") from None
        except defer.CancelledError:
            raise
        except Exception as e:
            raise BackendUnavailable(self.name, f"user bind failed: {_describe(e)}") from None
        name = canonical_name(values, user) or (dn if _usable(dn, MAX_DN_CHARS) else None)
        if name is None:
            raise BackendUnavailable(self.name, "the entry has no usable name")
        return Verified(name)


#: What the user name is replaced with to find the attribute it is compared with.
_PROBE = "smtpproxy-user-name-probe"
MAX_DN_CHARS = 1024


def user_attribute(template: str) -> str | None:
    """The one attribute the filter compares the user name with for equality, or None.

    C{(&(objectClass=person)(uid=%s))} gives C{uid}.  None when there is no
    such comparison, or several with different attributes (C{(|(uid=%s)(mail=%s))}):
    then no single stored value names the user, and the DN does.  Comparisons
    under C{!} do not count (they say what the user is not).
    """
    found: set[str] = set()
    pending: list[object] = [ldaptor_filter.parseFilter(user_filter(template, _PROBE))]
    while pending:
        node = pending.pop()
        if isinstance(node, pureldap.LDAPFilter_and | pureldap.LDAPFilter_or):
            pending.extend(node)
        elif (
            isinstance(node, pureldap.LDAPFilter_equalityMatch)
            and node.assertionValue.value == _PROBE
        ):
            found.add(_text(node.attributeDesc.value))
    lowered = {a.lower() for a in found}
    return found.pop() if len(lowered) == 1 else None


def _usable(value: str, limit: int) -> bool:
    """Short enough and printable: it becomes the identity's name in logs and limits."""
    return 0 < len(value) <= limit and value.isprintable()


def _fold(value: str) -> str:
    """Roughly the directory's caseIgnoreMatch: no case, runs of spaces as one, ends trimmed."""
    return " ".join(value.split()).casefold()


def canonical_name(values: list[str], user: str) -> str | None:
    """The stored value that names the user, as the directory keeps it; None if none fits.

    One value: that one.  Several (a multi-valued C{uid}): the one the
    typed name matched, compared as the directory compares.  A value that
    is too long or not printable is never used.
    """
    usable = [v for v in values if _usable(v, MAX_USER_CHARS)]
    if len(values) == 1:
        return usable[0] if usable else None
    wanted = _fold(user)
    matching = [v for v in usable if _fold(v) == wanted]
    return matching[0] if matching else None


async def _search(
    client: LDAPClient, base_dn: str, filter_text: str, attribute: str | None
) -> list[tuple[str, list[str]]]:
    """The entries matching C{filter_text} under C{base_dn}: at most two are asked for.

    Each is its DN and the values of C{attribute} (none asked when None).
    """
    request = pureldap.LDAPSearchRequest(
        baseObject=base_dn,
        scope=pureldap.LDAP_SCOPE_wholeSubtree,
        sizeLimit=2,
        filter=ldaptor_filter.parseFilter(filter_text),
        attributes=[attribute or "1.1"],
    )
    found: list[tuple[str, list[str]]] = []
    done: defer.Deferred[None] = defer.Deferred()

    def handle(message: object) -> bool:
        if isinstance(message, pureldap.LDAPSearchResultEntry):
            values: list[str] = []
            for kind, stored in message.attributes:
                if attribute is not None and _text(kind).lower() == attribute.lower():
                    values.extend(_text(v) for v in stored)
            found.append((_text(message.objectName), values))
            return False
        if isinstance(message, pureldap.LDAPSearchResultDone):
            code = message.resultCode
            if code in (0, ldaperrors.LDAPSizeLimitExceeded.resultCode):
                done.callback(None)
            else:
                done.errback(ldaperrors.get(code, message.errorMessage))
            return True
        return False

    client.send_multiResponse(request, handle)
    await done
    return found


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
