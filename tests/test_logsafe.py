"""Tests for L{smtpproxy.logsafe}: client values cut to a known size, user names hidden."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy.logsafe import MAX_TEXT, LoginNames, clip, clip_list


def json_size(text: str) -> int:
    """Bytes the value takes inside a JSON line, as the log writes it (quotes excluded)."""
    return len(json.dumps(text)) - 2


class ClipTests(SynchronousTestCase):
    def test_short_values_unchanged(self) -> None:
        """Ordinary addresses, ids and texts within the limit pass through as they are."""
        for text in ("", "a@example.com", "x" * MAX_TEXT, 'quoted "local"\\part', "\u00e9t\u00e9"):
            self.assertEqual(clip(text), text)

    def test_long_value_cut_with_note(self) -> None:
        """A long value keeps its start and says how much was left out."""
        clipped = clip("a" * 10_000)
        self.assertTrue(clipped.startswith("a" * 100))
        self.assertTrue(clipped.endswith("more characters]"))
        self.assertLessEqual(json_size(clipped), MAX_TEXT)
        omitted = int(clipped.rsplit("[", 1)[1].split()[0])
        self.assertEqual(clipped.index("."), 10_000 - omitted)

    def test_escapes_count(self) -> None:
        """Control characters, DEL and non-ASCII characters are measured as JSON writes
        them (6 bytes; DEL was once counted as 1, found by the property test below)."""
        for char in ("\x01", "\x7f", "\u00e9", "\U0001f600", '"', "\\", "\n"):
            clipped = clip(char * 500)
            self.assertLessEqual(json_size(clipped), MAX_TEXT, repr(char))
            self.assertTrue(clipped.startswith(char), repr(char))

    @given(st.text(max_size=600), st.integers(min_value=40, max_value=600))
    def test_bound_holds(self, text: str, limit: int) -> None:
        """Whatever the text, its clipped JSON form fits the limit and is a prefix plus note."""
        clipped = clip(text, limit)
        self.assertLessEqual(json_size(clipped), limit)
        if clipped != text:
            kept = clipped[: clipped.rindex("...[")]
            self.assertTrue(text.startswith(kept))

    def test_list(self) -> None:
        """A list is cut to its first entries, each clipped."""
        items = [f"r{i}@example.com" for i in range(50)] + ["x" * 999]
        self.assertEqual(clip_list(items), items[:20])
        self.assertEqual(clip_list(items[-1:], 5), [clip("x" * 999)])


class LoginNamesTests(SynchronousTestCase):
    def test_configured_user_logged_as_typed(self) -> None:
        """The configured user's name is the field C{username}, unchanged."""
        self.assertEqual(LoginNames(["app"]).fields("app"), {"username": "app"})

    def test_other_names_hashed(self) -> None:
        """Anything else is a 12-hex-digit hash, stable within one key and distinct across keys."""
        names = LoginNames(["app"], key=b"k" * 32)
        typed = names.fields("hunter2")
        self.assertEqual(list(typed), ["username_hash"])
        self.assertRegex(typed["username_hash"], "^[0-9a-f]{12}$")
        self.assertEqual(names.fields("hunter2"), typed)
        self.assertNotEqual(names.fields("hunter3"), typed)
        self.assertNotEqual(LoginNames(["app"], key=b"j" * 32).fields("hunter2"), typed)
        self.assertNotIn("hunter2", repr(typed))
        # Near misses of the configured name are not it.
        for near in ("App", "app ", "ap", "app\x00", ""):
            self.assertIn("username_hash", names.fields(near))

    def test_process_key(self) -> None:
        """Without an explicit key, all instances in a process hash alike (one log, one key)."""
        self.assertEqual(LoginNames([]).fields("x"), LoginNames(["y"]).fields("x"))

    def test_odd_text(self) -> None:
        """Lone surrogates and NULs hash without an error."""
        self.assertIn("username_hash", LoginNames([]).fields("\udc80\x00"))
