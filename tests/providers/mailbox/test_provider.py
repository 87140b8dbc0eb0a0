"""The mailbox provider: keeping, chaos, release, the SQLite copy, and chaos over SMTP."""

from __future__ import annotations

import smtplib
import sqlite3
from collections.abc import Sequence

from twisted.internet import defer
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from smtpproxy.config import Config
from smtpproxy.errors import PermanentDeliveryError, TransientDeliveryError
from smtpproxy.providers import create, envelope_refusal
from smtpproxy.providers.mailbox import chaos
from smtpproxy.providers.mailbox.persist import MailboxFile, Row
from smtpproxy.providers.mailbox.provider import MailboxProvider, ReleaseError
from smtpproxy.providers.mailbox.settings import MailboxSettings
from tests.providers.mailbox.helpers import email, raw_message
from tests.support import TIMEOUT, RecordingProvider, async_test, in_thread, start_relay


class CountingFile(MailboxFile):
    """The real SQLite file, recording each read-flag write the provider asks of it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.writes: list[int] = []

    def set_read(self, message_id: str, read: bool) -> defer.Deferred[None]:
        self.writes.append(1)
        return super().set_read(message_id, read)

    def set_read_many(self, ids: Sequence[str], read: bool) -> defer.Deferred[None]:
        self.writes.append(len(ids))
        return super().set_read_many(ids, read)


def settings(**changes: object) -> MailboxSettings:
    values = {f"mailbox_{k}": v for k, v in changes.items()}
    return MailboxSettings.from_config(Config.build(**values))


class ProviderTests(TestCase):
    def test_send_keeps_the_exact_bytes(self) -> None:
        """send() keeps the message, raw bytes unchanged, and fires at once in memory."""
        provider = MailboxProvider(settings(), Clock())
        raw = raw_message(text="line\r\n.dot line\r\n\x00binary")
        d = provider.send(email(raw))
        self.assertIsNone(self.successResultOf(d))
        stored = provider.store.get("latest")
        assert stored is not None
        self.assertEqual(stored.email.raw, raw)

    def test_data_stage_chaos(self) -> None:
        """With data chaos at 100 %, send() fails with the chosen code and keeps nothing."""
        triggers = chaos.parse_triggers("data=452:100")
        provider = MailboxProvider(settings(chaos=triggers), Clock())
        failure = self.failureResultOf(provider.send(email()), TransientDeliveryError)
        self.assertEqual(failure.value.code, 452)
        self.assertEqual(len(provider.store), 0)
        self.assertEqual(provider.store.counters.rejected, 1)

    def test_envelope_stages_through_the_hook(self) -> None:
        """The registry's hook finds the mailbox's sender and recipient checks; the draw
        decides; other providers have no hook."""
        draws = iter([0.5, 0.05, 0.99])
        triggers = chaos.parse_triggers("sender=451:10 recipient=550:100")
        provider = MailboxProvider(settings(chaos=triggers), Clock(), draw=lambda: next(draws))
        check = envelope_refusal(provider)
        assert check is not None
        self.assertIsNone(check("sender"))
        self.assertIsInstance(check("sender"), TransientDeliveryError)
        self.assertIsInstance(check("recipient"), PermanentDeliveryError)
        self.assertIsNone(envelope_refusal(RecordingProvider()))

    def test_release_sends_the_same_bytes_to_new_recipients(self) -> None:
        """release() hands the captured message, bytes untouched, to the release provider
        with only the envelope recipients changed."""
        target = RecordingProvider()
        provider = MailboxProvider(settings(), Clock(), release_to=target)
        provider.send(email(attachment=b"%PDF"))
        stored = provider.store.get("latest")
        assert stored is not None
        self.successResultOf(provider.release(stored, [" carol@example.net ", "dave@example.com"]))
        (sent,) = target.emails
        self.assertEqual(sent.envelope_to, ("carol@example.net", "dave@example.com"))
        self.assertEqual(sent.raw, stored.email.raw)
        self.assertEqual(sent.envelope_from, stored.email.envelope_from)

    def test_release_refusals(self) -> None:
        """No release provider, no recipients, or a non-address: a ReleaseError saying so;
        a failing release provider fails the Deferred."""
        plain = MailboxProvider(settings(), Clock())
        plain.send(email())
        stored = plain.store.get("latest")
        assert stored is not None
        with self.assertRaises(ReleaseError):
            plain.release(stored, ["a@example.com"])
        target = RecordingProvider(outcomes=[PermanentDeliveryError("no such user", "5.1.1")])
        provider = MailboxProvider(settings(), Clock(), release_to=target)
        for bad in ([], [" "], ["not an address"], ["a@example.com"] * 101):
            with self.assertRaises(ReleaseError):
                provider.release(stored, bad)
        self.failureResultOf(provider.release(stored, ["a@example.com"]), PermanentDeliveryError)

    def test_registry_builds_it_with_its_release_provider(self) -> None:
        """PROVIDER=mailbox through the registry, releasing through stdout here."""
        config = Config.build(provider="mailbox", mailbox_release_provider="stdout")
        provider = create("mailbox", config, Clock())
        assert isinstance(provider, MailboxProvider)
        assert provider.release_to is not None
        self.assertEqual(provider.release_to.name, "stdout")


class FileTests(TestCase):
    @async_test
    async def test_messages_survive_a_restart(self) -> None:
        """With MAILBOX_PATH, messages (bytes, ids, read state) come back after a restart;
        deleted and evicted ones do not; the count limit applies on load too."""
        from twisted.internet import reactor

        path = self.mktemp()
        first = MailboxProvider(settings(path=path), reactor, file=MailboxFile(path))
        raws = [raw_message(subject=f"m{n}") for n in range(4)]
        for raw in raws:
            await first.send(email(raw))
        newest = first.store.get("latest")
        assert newest is not None
        oldest = list(first.store.newest_first())[-1]
        first.mark_read(newest)
        await first.delete([oldest.id])
        ids = [m.id for m in first.store.newest_first()]
        await first.close()

        second = MailboxProvider(
            settings(path=path, max_messages=2), reactor, file=MailboxFile(path)
        )
        await second.send(email(raw_message(subject="after restart")))
        self.addCleanup(second.close)
        kept = list(second.store.newest_first())
        self.assertEqual([m.email.subject for m in kept], ["after restart", "m3"])
        self.assertEqual(kept[1].id, ids[0])
        self.assertEqual(kept[1].email.raw, raws[3])
        self.assertTrue(kept[1].read)
        with sqlite3.connect(path) as db:
            (count,) = db.execute("SELECT count(*) FROM messages").fetchone()
        self.assertEqual(count, 2)

    @async_test
    async def test_marking_many_read_is_one_write(self) -> None:
        """set_read on every message (PUT /api/v1/messages) is one write to the file,
        whatever their number, fired once committed; messages already in that state
        cost nothing.  One write per message would queue without bound."""
        from twisted.internet import reactor

        path = self.mktemp()
        file = CountingFile(path)
        provider = MailboxProvider(settings(path=path), reactor, file=file)
        self.addCleanup(provider.close)
        await defer.gatherResults(
            [provider.send(email(raw_message(subject=f"m{n}"))) for n in range(200)]
        )
        everything = list(provider.store.newest_first())
        await provider.set_read(everything, True)
        with sqlite3.connect(path) as db:
            (read,) = db.execute("SELECT count(*) FROM messages WHERE read = 1").fetchone()
        self.assertEqual(read, 200)
        await provider.set_read(everything, True)
        await provider.set_read(everything[:10], False)
        self.assertEqual(file.writes, [200, 10])
        self.assertEqual(sum(1 for m in provider.store.newest_first() if not m.read), 10)

    @async_test
    async def test_a_burst_is_written_whole_and_in_order(self) -> None:
        """Fifty sends at once (group commit puts several in one transaction): each fires
        once committed, and a restart reads all fifty back in arrival order."""
        from twisted.internet import reactor

        path = self.mktemp()
        first = MailboxProvider(settings(path=path), reactor, file=MailboxFile(path))
        sends = [first.send(email(raw_message(subject=f"m{n}"))) for n in range(50)]
        await defer.gatherResults(sends, consumeErrors=True)
        await first.close()
        second = MailboxProvider(settings(path=path), reactor, file=MailboxFile(path))
        self.addCleanup(second.close)
        await second.loaded()
        subjects = [m.email.subject for m in second.store.newest_first()]
        self.assertEqual(subjects, [f"m{n}" for n in reversed(range(50))])

    @async_test
    async def test_a_delete_before_the_commit_is_not_undone(self) -> None:
        """A message deleted (or evicted) while its row still waits for its batch stays
        gone: deletes join the write queue, so the row cannot be written after them."""
        from twisted.internet import reactor

        path = self.mktemp()
        first = MailboxProvider(settings(path=path), reactor, file=MailboxFile(path))
        await first.loaded()
        # The first send starts a transaction; the next two wait for the following one.
        sends = [first.send(email(raw_message(subject=f"m{n}"))) for n in range(3)]
        doomed = [m.id for m in first.store.newest_first()][:2]
        deleting = first.delete(doomed)
        await defer.gatherResults([*sends, deleting], consumeErrors=True)
        await first.close()
        with sqlite3.connect(path) as db:
            found = [row[0] for row in db.execute("SELECT id FROM messages")]
        self.assertEqual(len(found), 1)
        self.assertNotIn(doomed[0], found)
        self.assertNotIn(doomed[1], found)

    @async_test
    async def test_a_read_mark_before_the_commit_survives_a_reopen(self) -> None:
        """A row marked read (or unread again) while it still waits for its batch keeps
        that flag in the file: the marks join the write queue, so they cannot reach
        SQLite before the row does and update nothing."""
        path = self.mktemp()
        file = MailboxFile(path)
        await file.load(10, lambda row: row)
        rows = [
            Row(f"id{n}", float(n), "a@example.com", ("b@example.com",), b"x") for n in range(4)
        ]
        # The first insert starts a transaction; the rest wait for the following one.
        writes = [file.insert(row, []) for row in rows]
        writes.append(file.set_read("id1", True))
        writes.append(file.set_read_many(["id2", "id3"], True))
        writes.append(file.set_read_many(["id3"], False))
        await defer.gatherResults(writes, consumeErrors=True)
        file.close()

        again = MailboxFile(path)
        self.addCleanup(again.close)
        loaded = await again.load(10, lambda row: (row.id, row.read))
        self.assertEqual(loaded, [("id0", False), ("id1", True), ("id2", True), ("id3", False)])

    @async_test
    async def test_the_wal_is_checkpointed_beside_the_writer(self) -> None:
        """Past CHECKPOINT_BYTES of messages the background connection copies the WAL
        into the database file: a copy of that file alone (no WAL) holds the rows, long
        before SQLite's own checkpoint (BACKSTOP_PAGES) would have run."""
        import shutil

        from twisted.internet import reactor

        from smtpproxy.providers.mailbox import persist

        path = self.mktemp()
        file = MailboxFile(path)
        first = MailboxProvider(settings(path=path), reactor, file=file)
        big = b"x" * (persist.CHECKPOINT_BYTES // 4)
        for n in range(5):
            await first.send(email(raw_message(subject=f"m{n}", attachment=big)))
        self.assertLess(persist.CHECKPOINT_BYTES * 2, persist.BACKSTOP_PAGES * 4096)
        for _ in range(200):
            if not file._checkpointing:
                break
            await deferLater(reactor, 0.05)
        self.assertFalse(file._checkpointing)
        copy = self.mktemp()
        shutil.copyfile(path, copy)
        await first.close()
        with sqlite3.connect(copy) as db:
            (count,) = db.execute("SELECT count(*) FROM messages").fetchone()
        # Each raw message is about 1.37 MiB (base64): the third crosses 4 MiB.
        self.assertGreaterEqual(count, 3)

    @async_test
    async def test_an_unreadable_file_starts_empty(self) -> None:
        """A file that is not SQLite: logged, and the mailbox runs in memory from empty
        (a message is kept, and the file is left as it was)."""
        from twisted.internet import reactor

        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"not a database" * 100)
        provider = MailboxProvider(settings(path=path), reactor, file=MailboxFile(path))
        self.addCleanup(provider.close)
        await provider.send(email())
        self.assertEqual(len(provider.store), 1)
        self.assertIsNone(provider.file)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"not a database" * 100)


class ChaosOverSmtpTests(TestCase):
    """The envelope hook through the real SMTP server, as a client sees it."""

    @async_test
    async def test_each_stage_answers_its_code(self) -> None:
        """Sender chaos answers MAIL, recipient chaos answers RCPT, data chaos the final
        dot, each with the chosen code and a matching enhanced status; nothing is kept."""
        from twisted.internet import reactor

        results = {}
        for stage, code in (("sender", 451), ("recipient", 550), ("data", 452)):
            triggers = chaos.parse_triggers(f"{stage}={code}:100")
            provider = MailboxProvider(settings(chaos=triggers), reactor)
            relay = start_relay(self, provider=provider, tls_enabled=False)  # type: ignore[arg-type]

            def attempt(port: int = relay.port) -> tuple[int, bytes]:
                with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
                    try:
                        client.sendmail("a@example.com", ["b@example.org"], raw_message())
                    except smtplib.SMTPSenderRefused as e:
                        return e.smtp_code, e.smtp_error
                    except smtplib.SMTPRecipientsRefused as e:
                        code, text = e.recipients["b@example.org"]
                        return code, text if isinstance(text, bytes) else text.encode()
                    except smtplib.SMTPDataError as e:
                        error = e.smtp_error
                        return e.smtp_code, error if isinstance(error, bytes) else error.encode()
                return 250, b""

            results[stage] = await in_thread(attempt)
            self.assertEqual(len(provider.store), 0)
        self.assertEqual(results["sender"][0], 451)
        self.assertTrue(results["sender"][1].startswith(b"4.3.0 chaos"), results)
        self.assertEqual(results["recipient"][0], 550)
        self.assertTrue(results["recipient"][1].startswith(b"5.7.1 chaos"), results)
        self.assertEqual(results["data"][0], 452)
        self.assertTrue(results["data"][1].startswith(b"4.3.1 chaos"), results)

    @async_test
    async def test_chaos_off_delivers(self) -> None:
        """Without chaos the same path keeps the message (the test above can fail)."""
        from twisted.internet import reactor

        provider = MailboxProvider(settings(), reactor)
        relay = start_relay(self, provider=provider, tls_enabled=False)  # type: ignore[arg-type]

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT) as client:
                client.sendmail("a@example.com", ["b@example.org"], raw_message())

        await in_thread(send)
        self.assertEqual(len(provider.store), 1)
