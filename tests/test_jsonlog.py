"""Tests for L{smtpproxy.jsonlog}: one JSON object per line, whatever logged it."""

from __future__ import annotations

import io
import json
import os
import sys
from types import SimpleNamespace
from typing import Any

from twisted.application.app import ServerOptions
from twisted.logger import (
    ILogObserver,
    LogBeginner,
    Logger,
    LogLevel,
    LogPublisher,
)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import jsonlog
from tests.support import RecordingStream

# 2026-02-23T12:00:00.123456Z as a Unix time.
T = 1771848000.123456


class _Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.stream = RecordingStream()
        self.observer = jsonlog.make_observer("debug", self.stream)
        self.log = Logger(namespace="smtpproxy.test", observer=self.observer)

    def lines(self) -> list[dict[str, Any]]:
        """Every line written so far, parsed; each must be a JSON object on its own."""
        text = self.stream.getvalue()
        self.assertTrue(text == "" or text.endswith("\n"))
        parsed = [json.loads(line) for line in text.splitlines()]
        for item in parsed:
            self.assertIsInstance(item, dict)
        return parsed

    def only(self) -> dict[str, Any]:
        """The single line written so far."""
        lines = self.lines()
        self.assertEqual(len(lines), 1, lines)
        return lines[0]


class ShapeTests(_Case):
    """The fields every line has, and the project's message-plus-fields convention."""

    def test_fields(self) -> None:
        """A plain message with keyword fields becomes msg plus one key per field, in order."""
        self.log.info(
            "message accepted",
            id="a1b2",
            sender="app@example.com",
            recipients=["a@example.com", "b@example.com"],
            size=1234,
            auth=False,
            nothing=None,
        )
        line = self.only()
        self.assertEqual(
            list(line),
            [
                "ts",
                "level",
                "logger",
                "msg",
                "id",
                "sender",
                "recipients",
                "size",
                "auth",
                "nothing",
            ],
        )
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["logger"], "smtpproxy.test")
        self.assertEqual(line["msg"], "message accepted")
        self.assertEqual(line["recipients"], ["a@example.com", "b@example.com"])
        self.assertEqual(line["size"], 1234)
        self.assertIs(line["auth"], False)
        self.assertIsNone(line["nothing"])

    def test_timestamp(self) -> None:
        """The time is ISO 8601 in UTC with milliseconds and a Z."""
        event = {"log_time": T, "log_level": LogLevel.info, "log_namespace": "x", "log_format": ""}
        self.assertEqual(json.loads(jsonlog.render_event(event))["ts"], "2026-02-23T12:00:00.123Z")

    def test_twisted_format_strings(self) -> None:
        """Twisted-style events have their format filled in, and keep the fields too."""
        self.log.warn("connection from {peer} lost after {n} bytes", peer="192.0.2.1", n=5)
        line = self.only()
        self.assertEqual(line["msg"], "connection from 192.0.2.1 lost after 5 bytes")
        self.assertEqual((line["level"], line["peer"], line["n"]), ("warn", "192.0.2.1", 5))

    def test_one_write_per_line(self) -> None:
        """Each event is exactly one write() of one line, even with newlines in the data."""
        self.log.info("two\nlines", detail="a\r\nb\u2028c")
        self.log.error("second")
        self.assertEqual(len(self.stream.writes), 2)
        for text in self.stream.writes:
            self.assertTrue(text.endswith("\n"))
            self.assertEqual(text.count("\n"), 1)
            self.assertNotIn("\r", text)
            self.assertNotIn("\u2028", text)
        self.assertEqual(self.lines()[0]["detail"], "a\r\nb\u2028c")
        self.assertGreaterEqual(self.stream.flushes, 2)

    def test_reserved_names(self) -> None:
        """Fields named like the fixed keys are renamed rather than overwriting them."""
        # Logger's own signature already forbids a "level" keyword; other
        # emitters (legacy log.msg, hand-made events) can still send one.
        self.log.info("real", msg="fake", ts=0, logger="y", error="timeout")
        line = self.only()
        self.assertEqual(line["msg"], "real")
        self.assertEqual(line["level"], "info")
        self.assertEqual(
            (line["field_msg"], line["field_ts"], line["field_logger"]), ("fake", 0, "y")
        )
        event = {"log_level": LogLevel.warn, "log_namespace": "x", "log_format": "m", "level": 1}
        self.assertEqual(json.loads(jsonlog.render_event(event))["field_level"], 1)
        # Without a traceback, "error" is free for the caller's own use.
        self.assertEqual(line["error"], "timeout")

    def test_not_serialisable(self) -> None:
        """Values JSON cannot carry are printed as their repr; the line stays valid JSON."""

        class Odd:
            def __repr__(self) -> str:
                return "<Odd>"

        class Broken:
            def __repr__(self) -> str:
                raise RuntimeError("no repr")

        loop: list[object] = []
        loop.append(loop)
        self.log.info(
            "odd values",
            obj=Odd(),
            data=b"\x00\xff",
            nested={"inner": Odd()},
            tuple_keys={(1, 2): "x"},
            nan=float("nan"),
            loop=loop,
            broken=Broken(),
        )
        line = self.only()
        self.assertEqual(line["obj"], "<Odd>")
        self.assertEqual(line["data"], repr(b"\x00\xff"))
        self.assertEqual(line["nested"], {"inner": "<Odd>"})
        self.assertEqual(line["tuple_keys"], "{(1, 2): 'x'}")
        self.assertEqual(line["nan"], "nan")
        self.assertIn("[...]", line["loop"])
        self.assertEqual(line["broken"], "<unrepresentable Broken>")


class FailureTests(_Case):
    """Tracebacks arrive under "error", whichever API logged them."""

    def boom(self) -> Failure:
        try:
            raise ValueError("the cause")
        except ValueError:
            return Failure()

    def test_failure(self) -> None:
        """Logger.failure puts the message in msg and the traceback in error."""
        self.log.failure("delivery crashed", self.boom(), id="x1", error="caller's")
        line = self.only()
        self.assertEqual(line["level"], "critical")
        self.assertEqual(line["msg"], "delivery crashed")
        self.assertEqual(line["id"], "x1")
        self.assertIn("Traceback", line["error"])
        self.assertIn("ValueError: the cause", line["error"])
        self.assertIn("in boom", line["error"])
        self.assertEqual(line["field_error"], "caller's")

    def test_failure_at_error_level(self) -> None:
        """A failure may be logged at another level; it is still rendered."""
        self.log.failure("retrying", self.boom(), level=LogLevel.warn)
        line = self.only()
        self.assertEqual(line["level"], "warn")
        self.assertIn("ValueError: the cause", line["error"])


class LegacyTests(_Case):
    """Messages from C{twisted.python.log}, which much of Twisted still uses."""

    def setUp(self) -> None:
        super().setUp()
        publisher = LogPublisher(self.observer)
        self.legacy = legacy_log.LogPublisher(
            observerPublisher=publisher, publishPublisher=publisher
        )

    def test_msg(self) -> None:
        """log.msg becomes an info line with its text, system and fields."""
        self.legacy.msg("Starting factory", "<x>", system="SMTP,3,192.0.2.1", port=2525)
        line = self.only()
        self.assertEqual(line["level"], "info")
        self.assertEqual(line["msg"], "Starting factory <x>")
        self.assertEqual(line["system"], "SMTP,3,192.0.2.1")
        self.assertEqual(line["port"], 2525)
        for key in ("message", "isError", "time", "format"):
            self.assertNotIn(key, line)

    def test_default_system_left_out(self) -> None:
        """The placeholder system "-" adds nothing, so it is not printed."""
        self.legacy.msg("hello", system="-")
        self.assertNotIn("system", self.only())

    def test_err(self) -> None:
        """log.err's failure becomes a critical line: the reason in msg, the traceback in error."""
        try:
            raise KeyError("gone")
        except KeyError:
            failure = Failure()
        # What twisted.python.log.err(failure, why) sends.
        self.legacy.msg(failure=failure, why="Unhandled error in Deferred:", isError=1)
        line = self.only()
        self.assertEqual(line["level"], "critical")
        self.assertEqual(line["msg"], "Unhandled error in Deferred:")
        self.assertIn("KeyError: 'gone'", line["error"])
        self.assertNotIn("why", line)
        self.assertNotIn("failure", line)

    def test_format(self) -> None:
        """Old printf-style format events are rendered too."""
        self.legacy.msg(format="%(count)d connections", count=3)
        self.assertEqual(self.only()["msg"], "3 connections")


class RedactionTests(_Case):
    """Fields whose names suggest secrets never reach the stream (R6.5 safety net)."""

    def test_names(self) -> None:
        """password, secret, token and authorization are masked, in any case or position."""
        self.log.info(
            "login",
            password="hunter2",
            SMTP_PASSWORD="hunter3",
            client_secret="s3cr3t",
            access_token="eyJhbGc",
            Authorization="Bearer eyJhbGc",
            user="alice",
        )
        line = self.only()
        for key in ("password", "SMTP_PASSWORD", "client_secret", "access_token", "Authorization"):
            self.assertEqual(line[key], "***")
        self.assertEqual(line["user"], "alice")
        text = self.stream.getvalue()
        for secret in ("hunter2", "hunter3", "s3cr3t", "eyJhbGc"):
            self.assertNotIn(secret, text)

    def test_nested(self) -> None:
        """Secrets nested in dicts and lists are masked too."""
        self.log.info(
            "request",
            headers={"authorization": "Bearer abc", "accept": "application/json"},
            attempts=[{"token": "abc", "status": 401}],
        )
        line = self.only()
        self.assertEqual(line["headers"], {"authorization": "***", "accept": "application/json"})
        self.assertEqual(line["attempts"], [{"token": "***", "status": 401}])
        self.assertNotIn("abc", self.stream.getvalue())

    def test_inside_unserialisable_value(self) -> None:
        """A value printed by repr is masked before it is printed."""
        self.log.info("odd", options={("tls", 1): True, "password": "hunter2"})
        line = self.only()
        self.assertIn("'password': '***'", line["options"])
        self.assertNotIn("hunter2", self.stream.getvalue())

    def test_in_format_string(self) -> None:
        """A format string that names a secret field shows the mask, not the value."""
        self.log.info("using {client_secret}", client_secret="s3cr3t")
        self.assertEqual(self.only()["msg"], "using ***")
        self.assertNotIn("s3cr3t", self.stream.getvalue())


class LevelTests(SynchronousTestCase):
    """The configured level drops quieter events, for our code and Twisted's alike."""

    def emit_all(self, level: str) -> list[str]:
        stream = io.StringIO()
        observer = jsonlog.make_observer(level, stream)
        for namespace in ("smtpproxy.x", "twisted.internet"):
            log = Logger(namespace=namespace, observer=observer)
            log.debug("d")
            log.info("i")
            log.warn("w")
            log.error("e")
            log.critical("c")
        return [json.loads(line)["level"] for line in stream.getvalue().splitlines()]

    def test_levels(self) -> None:
        """Each configured level keeps itself and everything louder."""
        everything = ["debug", "info", "warn", "error", "critical"]
        for index, level in enumerate(["debug", "info", "warn", "error"]):
            self.assertEqual(self.emit_all(level), everything[index:] * 2, level)

    def test_aliases_and_bad_names(self) -> None:
        """ "warning" means warn; "WARN " is accepted; unknown names are refused."""
        self.assertIs(jsonlog.parse_level("warning"), LogLevel.warn)
        self.assertIs(jsonlog.parse_level("WARN "), LogLevel.warn)
        error = self.assertRaises(ValueError, jsonlog.parse_level, "verbose")
        self.assertIn("'verbose'", str(error))
        self.assertRaises(ValueError, jsonlog.make_observer, "loud", io.StringIO())

    def test_set_level(self) -> None:
        """The level can be changed after the observer is made."""
        stream = io.StringIO()
        observer = jsonlog.make_observer("error", stream)
        log = Logger(namespace="smtpproxy.x", observer=observer)
        log.info("dropped")
        observer.set_level("debug")
        log.debug("kept")
        self.assertEqual([json.loads(x)["msg"] for x in stream.getvalue().splitlines()], ["kept"])

    def test_events_without_level_dropped(self) -> None:
        """Events with no level (which Twisted never sends) are dropped, not crashed on."""
        stream = io.StringIO()
        jsonlog.make_observer("debug", stream)({"log_namespace": "x", "log_format": "no level"})
        self.assertEqual(stream.getvalue(), "")


class SetupTests(SynchronousTestCase):
    """Wiring into the process: install() and twistd's --logger option."""

    def test_install(self) -> None:
        """install() sends earlier and later events to the stream, and leaves stdio alone."""
        publisher = LogPublisher()
        stdio = SimpleNamespace(stdout=io.StringIO(), stderr=io.StringIO())
        warnings_module = SimpleNamespace(showwarning=lambda *a, **k: None)
        beginner = LogBeginner(publisher, io.StringIO(), stdio, warnings_module)
        log = Logger(namespace="smtpproxy.x", observer=publisher)
        log.info("before")
        stream = io.StringIO()
        stdout = stdio.stdout
        observer = jsonlog.install("info", stream, beginner=beginner)
        log.debug("quiet")
        log.info("after")
        self.assertTrue(ILogObserver.providedBy(observer))
        messages = [json.loads(x)["msg"] for x in stream.getvalue().splitlines()]
        self.assertEqual(messages, ["before", "after"])
        self.assertIs(stdio.stdout, stdout)
        self.assertEqual(stdout.getvalue(), "")

    def test_twistd_logger_option(self) -> None:
        """twistd --logger=smtpproxy.jsonlog.observer resolves to our factory."""
        options = ServerOptions()
        options.parseOptions(["--logger=smtpproxy.jsonlog.observer"])
        self.assertIs(options["logger"], jsonlog.observer)

    def test_observer_factory(self) -> None:
        """The factory writes to stderr at the level in LOG_LEVEL."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.patch(os, "environ", {"LOG_LEVEL": "warn"})
        log = Logger(namespace="smtpproxy.x", observer=jsonlog.observer())
        log.info("dropped")
        log.warn("kept")
        self.assertEqual([json.loads(x)["msg"] for x in stderr.getvalue().splitlines()], ["kept"])

    def test_observer_factory_bad_level(self) -> None:
        """An unknown LOG_LEVEL does not stop logging; the factory falls back to info."""
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.patch(os, "environ", {"LOG_LEVEL": "chatty"})
        log = Logger(namespace="smtpproxy.x", observer=jsonlog.observer())
        log.debug("dropped")
        log.info("kept")
        self.assertEqual([json.loads(x)["msg"] for x in stderr.getvalue().splitlines()], ["kept"])
