"""Everything said to an SMTP client: one reply method, budgets, batched writes.

A part of L{smtpproxy.smtp.protocol.RelayProtocol} (see L{smtpproxy.smtp.base}).
"""

from __future__ import annotations

from smtpproxy.errors import Reply
from smtpproxy.smtp.base import PAUSE_INPUT_AT, ShellBase
from smtpproxy.smtp.session import Budget, ReplyBudget, Say, wire


class Output(ShellBase):
    """Replies formatted, charged to their budget and sent (batched while input is handled)."""

    def reply(
        self,
        reply: Say | Reply | int,
        status: str = "",
        text: str = "",
        *,
        counts_as: Budget | None = None,
    ) -> None:
        """Send a reply: the one way anything is said to the client.

        @param reply: what the session said (a L{Say}), or a L{Reply}, or
            its code with C{status} ("" for none) and C{text}; line breaks
            in the text are never sent.
        @param counts_as: (not with a L{Say}, which carries its own)
            L{ERROR} for a client's mistake, L{REFUSAL} for a policy
            refusal: the reply counts against that budget
            (C{SMTP_MAX_ERRORS}, C{SMTP_MAX_REFUSALS}); when it is spent, a
            421 goes out instead and the session closes.

        Replies are batched by L{_send} while a batch of input is handled.
        """
        if type(reply) is Say:
            counts_as = reply.counts_as
            if counts_as is None:
                # Most of the session's replies: formatted once, no budget.
                self._send(self._said(reply))
                return
        elif isinstance(reply, int):
            reply = Reply(reply, status, text)
            if counts_as is None:
                # The shell's own replies (250 delivered, 235, ...).
                self._send(wire(reply))
                return
        elif not isinstance(reply, Reply):
            counts_as = reply.counts_as
        if counts_as is not None:
            if self._budget is None:
                self._budget = ReplyBudget(self.settings.max_errors, self.settings.max_refusals)
            last = self._budget.charge(counts_as)
            if last is not None:
                self._send(wire(last))
                self._close()
                return
        self._send(self._said(reply) if isinstance(reply, Say) else wire(reply))

    def _said(self, say: Say) -> bytes:
        """A L{Say} as sent: EHLO's greeting becomes the first line of a multi-line reply."""
        if say.keywords:
            return b"%d-%s%s" % (say.reply.code, say.wire[4:], self._extension_reply())
        return say.wire

    def _send(self, data: bytes) -> None:
        if not self._corked:
            self._write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > PAUSE_INPUT_AT:
            # A client pipelining faster than it reads: hand the replies to
            # the transport now so that its flow control can stop us.
            self._flush()

    def _uncork(self) -> None:
        self._corked = False
        self._flush()

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._pending = []
        self._pending_size = 0
        self._write(data)

    def _extension_reply(self) -> bytes:
        """EHLO's keyword lines as sent, built once per listener for each state they depend on."""
        session = self.session
        key = (session.tls_available and not session.tls_active, session.auth_offered())
        cache = self.factory.ehlo_cache
        lines = cache.get(key)
        if lines is None:
            keywords = self.listExtensions().splitlines()
            lines = b"".join(b"250-%s\r\n" % line for line in keywords[:-1])
            lines += b"250 %s\r\n" % keywords[-1]
            cache[key] = lines
        return lines
