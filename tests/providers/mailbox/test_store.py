"""The mailbox store and its search, without sockets or a reactor."""

from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.providers.mailbox.search import MAX_QUERY, MAX_TERMS, Term, parse, parse_query
from smtpproxy.providers.mailbox.store import Store, TooLargeError, held_bytes
from tests.providers.mailbox.helpers import email


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def store(max_messages: int = 1000, max_bytes: int = 10**9) -> Store:
    ids = iter(f"id{n}" for n in range(10**6))
    return Store(max_messages, max_bytes, Clock(), lambda: next(ids))


class StoreTests(SynchronousTestCase):
    def test_newest_first_paging_and_latest(self) -> None:
        """Pages count from the newest message; C{latest} is the newest."""
        s = store()
        for n in range(5):
            s.add(email(subject=f"m{n}"))
        self.assertEqual([m.email.subject for m in s.page(0, 2)], ["m4", "m3"])
        self.assertEqual([m.email.subject for m in s.page(3, 10)], ["m1", "m0"])
        latest = s.get("latest")
        assert latest is not None
        self.assertEqual(latest.email.subject, "m4")
        self.assertIsNone(s.get("nope"))

    def test_count_limit_evicts_the_oldest(self) -> None:
        """Past MAILBOX_MAX_MESSAGES the oldest message goes, one per new one."""
        s = store(max_messages=3)
        evicted = []
        for n in range(5):
            _, gone = s.add(email(subject=f"m{n}"))
            evicted += [m.email.subject for m in gone]
        self.assertEqual(len(s), 3)
        self.assertEqual(evicted, ["m0", "m1"])
        self.assertEqual([m.email.subject for m in s.newest_first()], ["m4", "m3", "m2"])

    def test_byte_limit_evicts_until_the_new_one_fits(self) -> None:
        """The byte cap counts raw plus decoded parts; as many old messages go as needed."""
        one = email(subject="big", attachment=b"x" * 5000)
        cost = held_bytes(one)
        self.assertGreater(cost, one.size + 5000 - 1)
        s = store(max_bytes=cost * 2 + 10)
        s.add(one)
        s.add(one)
        self.assertEqual(len(s), 2)
        s.add(one)
        self.assertEqual(len(s), 2)
        self.assertLessEqual(s.bytes_held, cost * 2 + 10)

    def test_a_message_larger_than_the_mailbox_is_refused(self) -> None:
        """One message over the byte cap is refused and counted, the others stay."""
        s = store(max_bytes=2000)
        s.add(email(subject="small"))
        with self.assertRaises(TooLargeError):
            s.add(email(subject="huge", attachment=b"y" * 5000))
        self.assertEqual(len(s), 1)
        self.assertEqual(s.counters.rejected, 1)

    def test_delete_and_clear_keep_the_byte_count(self) -> None:
        """Deleting gives the bytes back; clear empties the store and counts the deletions."""
        s = store()
        a, _ = s.add(email(subject="a"))
        s.add(email(subject="b"))
        self.assertEqual(s.delete([a.id, "missing"]), [a.id])
        self.assertEqual(len(s.clear()), 1)
        self.assertEqual((len(s), s.bytes_held, s.counters.deleted), (0, 0, 2))

    def test_listeners_hear_each_new_message_until_they_stop(self) -> None:
        """subscribe() is how the live page learns about mail; the returned function stops it."""
        s = store()
        heard: list[str] = []
        stop = s.subscribe(lambda m: heard.append(m.email.subject))
        s.add(email(subject="one"))
        stop()
        s.add(email(subject="two"))
        self.assertEqual(heard, ["one"])

    def test_parts_are_numbered_and_found(self) -> None:
        """Attachments get part ids 1, 2, ... that part() finds again."""
        s = store()
        stored, _ = s.add(email(attachment=b"%PDF-1.4"))
        part = stored.part("1")
        assert part is not None
        self.assertEqual(part.attachment.data, b"%PDF-1.4")
        self.assertIsNone(stored.part("2"))


class SearchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = store()
        self.store.add(email(subject="Invoice 42", to="billing@example.org", text="Pay soon"))
        self.store.add(
            email(subject="Welcome aboard", sender="Carol <carol@example.net>", text="Hello there")
        )
        self.store.add(email(subject="Report", attachment=b"data", cc="dave@example.com"))

    def subjects(self, query: str) -> list[str]:
        return [m.email.subject for m in self.store.search(query)]

    def test_fields_words_phrases_and_negation(self) -> None:
        """to:, from:, subject:, cc:, plain words, quoted phrases and -exclusions all apply."""
        self.assertEqual(self.subjects("to:billing"), ["Invoice 42"])
        self.assertEqual(self.subjects("from:carol"), ["Welcome aboard"])
        self.assertEqual(self.subjects('subject:"welcome aboard"'), ["Welcome aboard"])
        self.assertEqual(self.subjects("cc:dave"), ["Report"])
        self.assertEqual(self.subjects("pay"), ["Invoice 42"])
        self.assertEqual(self.subjects("-subject:report"), ["Welcome aboard", "Invoice 42"])
        self.assertEqual(self.subjects("has:attachment"), ["Report"])
        self.assertEqual(self.subjects(""), ["Report", "Welcome aboard", "Invoice 42"])
        self.assertEqual(self.subjects("HELLO THERE"), ["Welcome aboard"])
        self.assertEqual(self.subjects("nothing-like-this"), [])

    def test_read_state(self) -> None:
        """is:read and is:unread follow the Read flag."""
        first = next(self.store.newest_first())
        first.read = True
        self.assertEqual(self.subjects("is:read"), ["Report"])
        self.assertEqual(self.subjects("is:unread"), ["Welcome aboard", "Invoice 42"])

    def test_parse_query(self) -> None:
        """A query splits into terms: fields only when known, an unclosed quote runs to the end."""
        self.assertEqual(
            parse_query('to:a "b c" -from:d !e http://x unknown:f subject:"g'),
            (
                Term("to", "a"),
                Term(None, "b c"),
                Term("from", "d", negated=True),
                Term(None, "e", negated=True),
                Term(None, "http://x"),
                Term(None, "unknown:f"),
                Term("subject", "g"),
            ),
        )
        self.assertEqual(len(parse_query("w " * 1000)), MAX_TERMS)

    def test_a_cut_query_says_so(self) -> None:
        """Past MAX_QUERY characters or MAX_TERMS terms the parser keeps the beginning and
        says why, so no caller acts on a query whose tail (an exclusion, say) was lost."""
        whole = parse(" ".join(["w"] * MAX_TERMS))
        self.assertIsNone(whole.cut)
        self.assertIsNone(whole.refusal(deleting=True))
        terms = parse(" ".join(["w"] * MAX_TERMS) + " -subject:keep")
        self.assertEqual(len(terms.terms), MAX_TERMS)
        self.assertEqual(terms.cut, f"more than {MAX_TERMS} terms")
        long = parse("subject:" + "a" * MAX_QUERY + " -from:boss")
        self.assertEqual(long.cut, f"more than {MAX_QUERY} characters")
        for query in (terms, long):
            for deleting in (False, True):
                refusal = query.refusal(deleting)
                assert refusal is not None
                self.assertIn("past the search limits", refusal)
        # Spaces past the limit lose nothing.
        self.assertIsNone(parse("to:a" + " " * MAX_QUERY).cut)

    def test_pieces_without_a_condition_are_reported(self) -> None:
        """A lone quote or dash, a field without a value, an is:/has: value not kept here
        match nothing and are skipped by a search; they are listed, and a delete by
        search with one of them, or with no condition at all, is refused."""
        query = parse('subject: - to:"" is:starred has:pdf from:alice is:tagged "')
        self.assertEqual(query.terms, (Term("from", "alice"), Term("is", "tagged")))
        self.assertEqual(query.vague, ("subject:", "-", 'to:""', "is:starred", "has:pdf", '"'))
        self.assertIsNone(query.refusal(deleting=False))
        refusal = query.refusal(deleting=True)
        assert refusal is not None
        self.assertIn("'subject:'", refusal)
        for nothing in ("", "   ", '"', "subject:"):
            self.assertEqual(parse(nothing).terms, ())
            self.assertIsNotNone(parse(nothing).refusal(deleting=True), nothing)
        self.assertIsNone(parse("has:attachments is:unread").refusal(deleting=True))

    def test_hostile_queries_take_linear_time(self) -> None:
        """The longest query over the biggest searchable text stays well under a second:
        the query is capped, each term is one substring search."""
        big = store()
        big.add(email(text="a" * 200_000))
        started = time.perf_counter()
        big.search(("a" * 99 + "b ") * 20)
        big.search('"' + "a" * 10_000)
        self.assertLess(time.perf_counter() - started, 1.0)
