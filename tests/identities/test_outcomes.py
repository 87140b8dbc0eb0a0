"""How the router turns several backends' answers into one outcome, without sockets.

The backends here are scripted: the router (which answer wins, what is
counted) is what these tests check, not the backends.
"""

from __future__ import annotations

from twisted.cred import credentials, error
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.identities.builtin import BuiltinBackend
from smtpproxy.identities.errors import BackendUnavailable, NoSuchUser, RefusedWhileUnavailable
from smtpproxy.identities.fileformat import ProviderEntry
from smtpproxy.identities.model import Backend, Identity, Verified
from smtpproxy.identities.router import IdentityChecker


class Scripted:
    """A backend that gives one fixed answer and records who asked."""

    def __init__(self, name: str, answer: Verified | Exception) -> None:
        self.name = name
        self.answer = answer
        self.asked: list[str] = []

    def check(self, user: str, secret: str) -> defer.Deferred[Verified]:
        self.asked.append(user)
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


def down(name: str) -> Scripted:
    return Scripted(name, BackendUnavailable(name, "connection refused"))


def checker(*backends: Backend) -> IdentityChecker:
    entries = [ProviderEntry(b.name, "userpass", {}, fallback=True) for b in backends]
    return IdentityChecker(entries, {b.name: b for b in backends}, Clock())


def login(case: SynchronousTestCase, c: IdentityChecker) -> object:
    """The outcome of one plain login: an Identity, or the exception it failed with."""
    d = c.requestAvatarId(credentials.UsernamePassword(b"app", b"guess"))
    results: list[object] = []
    d.addBoth(results.append)
    case.assertEqual(len(results), 1, "the scripted login did not finish at once")
    result = results[0]
    return getattr(result, "value", result)


class OutcomeTests(SynchronousTestCase):
    def test_refusal_while_another_is_down_is_temporary_but_counted(self) -> None:
        """A backend that holds the user refuses the secret while another fallback is down:
        the outcome is RefusedWhileUnavailable (454, counted), naming the refusing provider,
        in either order of the two in the file."""
        for order in ((0, 1), (1, 0)):
            backends = (Scripted("apps", error.UnauthorizedLogin("wrong")), down("corp"))
            outcome = login(self, checker(*(backends[i] for i in order)))
            self.assertIsInstance(outcome, RefusedWhileUnavailable)
            assert isinstance(outcome, RefusedWhileUnavailable)
            self.assertEqual(outcome.provider, "apps")
            self.assertIn("corp", outcome.reason)

    def test_unknown_name_while_another_is_down_is_not_counted(self) -> None:
        """Only backends that do not hold the name answered (NoSuchUser), one is down: plain
        BackendUnavailable (454, not counted), since the name may be the down backend's
        user and no secret was tested."""
        outcome = login(self, checker(Scripted("apps", NoSuchUser("no such user")), down("corp")))
        self.assertIs(type(outcome), BackendUnavailable)

    def test_every_backend_refusing_is_a_refusal(self) -> None:
        """With every backend answering no (wrong password or unknown name) the outcome is
        UnauthorizedLogin (535, counted), never one of the unavailable kinds."""
        outcome = login(
            self,
            checker(
                Scripted("apps", NoSuchUser("no such user")),
                Scripted("corp", error.UnauthorizedLogin("wrong")),
            ),
        )
        self.assertIsInstance(outcome, error.UnauthorizedLogin)
        self.assertNotIsInstance(outcome, BackendUnavailable)
        outcome = login(self, checker(Scripted("apps", NoSuchUser("no such user"))))
        self.assertIsInstance(outcome, error.UnauthorizedLogin)

    def test_a_yes_wins_over_refusals_and_outages(self) -> None:
        """A down backend and a refusing one do not stop a later backend's yes."""
        yes = Scripted("third", Verified("app"))
        outcome = login(
            self, checker(down("corp"), Scripted("apps", error.UnauthorizedLogin("wrong")), yes)
        )
        self.assertIsInstance(outcome, Identity)
        self.assertEqual(yes.asked, ["app"])


class BuiltinUserTests(SynchronousTestCase):
    def test_only_its_own_name_is_tested(self) -> None:
        """SMTP_USERNAME's user, asked first among the fallbacks, refuses another name as
        NoSuchUser (so a fallback's user is not counted while that fallback is down) and a
        wrong password for its own name as a plain refusal (counted)."""
        backend = BuiltinBackend("relay", "relay-pw")
        self.assertEqual(self.successResultOf(backend.check("relay", "relay-pw")).user, "relay")
        self.failureResultOf(backend.check("alice", "relay-pw"), NoSuchUser)
        wrong = self.failureResultOf(backend.check("relay", "guess"), error.UnauthorizedLogin)
        self.assertNotIsInstance(wrong.value, NoSuchUser)
        # In the router: a login for a name the down fallback may hold is not counted.
        outcome = login(self, checker(backend, down("corp")))
        self.assertIs(type(outcome), BackendUnavailable)
