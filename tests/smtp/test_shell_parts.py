"""The SMTP shell's parts (smtpproxy.smtp.base's list) fit together at run time."""

from __future__ import annotations

import ast
import inspect

from twisted.mail.smtp import ESMTP
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.smtp import base
from smtpproxy.smtp.protocol import RelayProtocol


def _contract() -> list[str]:
    """The method names declared in ShellBase's TYPE_CHECKING block."""
    tree = ast.parse(inspect.getsource(base))
    shell = next(
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "ShellBase"
    )
    block = next(node for node in shell.body if isinstance(node, ast.If))
    return [node.name for node in block.body if isinstance(node, ast.FunctionDef)]


class ShellPartsTests(SynchronousTestCase):
    def test_every_declared_method_is_defined_by_a_part(self) -> None:
        """Each method one part calls in another exists, in our code, not only in ESMTP.

        The declarations exist only for mypy; if a part lost (or renamed) a
        method the others call, mypy would still pass and a session would
        reach Twisted's own version (setTimeout, resetTimeout) or fail with
        AttributeError on a rare path.
        """
        names = _contract()
        self.assertGreater(len(names), 10)
        for name in names:
            owners = [k for k in RelayProtocol.__mro__ if name in vars(k)]
            self.assertTrue(owners, f"{name} is defined nowhere")
            owner = owners[0]
            self.assertTrue(
                owner.__module__.startswith("smtpproxy.smtp."),
                f"{name} comes from {owner.__module__}",
            )
            self.assertNotEqual(owner, ESMTP)

    def test_the_parts_come_before_twisted_in_the_mro(self) -> None:
        """Our timer and input loop replace TimeoutMixin's and LineReceiver's, never the reverse."""
        mro = RelayProtocol.__mro__
        self.assertLess(mro.index(base.ShellBase), mro.index(ESMTP))
        for name in ("setTimeout", "resetTimeout", "timeoutConnection", "dataReceived"):
            owner = next(k for k in mro if name in vars(k))
            self.assertTrue(owner.__module__.startswith("smtpproxy."), name)
