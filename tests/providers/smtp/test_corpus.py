"""The shared corpus relayed through the provider arrives byte for byte.

Each message of C{shared/corpus/mime} (skipped when the folder is absent)
goes through one provider, over one reused connection, to the scripted
upstream, which unstuffs the dots as any server does.  Line ends are made
CRLF first, as every SMTP client sends them; after that, what the upstream
stores must be exactly what the relay was given.
"""

from __future__ import annotations

import re

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from smtpproxy.mime.message import Email
from smtpproxy.providers.smtp.provider import SmtpProvider
from tests.mime.test_corpus import corpus_files
from tests.providers.smtp.upstream import Script, listen, port_of, relay_settings
from tests.support import async_test


class CorpusTests(TestCase):
    timeout = 120

    @async_test
    async def test_corpus_arrives_byte_identical(self) -> None:
        """All corpus messages: what the upstream stored equals the CRLF message handed over."""
        files = corpus_files()
        if not files:
            raise SkipTest("the shared corpus (../shared/corpus/mime) is not here")
        script = Script()
        port = await listen(script)
        self.addCleanup(port.stopListening)
        provider = SmtpProvider(relay_settings(port_of(port)), reactor)
        self.addCleanup(provider.close)
        sent = []
        for path in files:
            raw = re.sub(rb"\r\n|\r|\n", b"\r\n", path.read_bytes())
            if raw and not raw.endswith(b"\r\n"):
                raw += b"\r\n"
            sent.append(raw)
            await provider.send(Email("a@example.com", ("b@example.org",), raw))
        self.assertEqual(len(script.bodies), len(files))
        for path, want, got in zip(files, sent, script.bodies, strict=True):
            self.assertEqual(got, want, path.name)
        self.assertEqual(script.connections, 1)
