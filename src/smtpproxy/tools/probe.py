"""C{smtpproxy probe HOST[:PORT]}: what an SMTP server offers, and whether it works.

One connection, step by step: connect, (implicit TLS,) greeting, EHLO,
STARTTLS and the handshake, EHLO again, optionally AUTH, QUIT; each step
timed.  The TLS session's version and cipher and the server's certificate
chain are reported, and the chain is verified for HOST against the system
CAs (or C{--ca-file}) after the handshake, so a certificate that does not
verify is described rather than merely refused.

The report ends with one line, C{OK: ...}, C{WARN: ...} or C{FAIL: ...},
and the exit status says the same: 0 OK, 3 WARN (it works, but something
needs attention: a certificate that does not verify or expires soon, TLS
older than 1.2, AUTH offered in clear text), 1 FAIL, 2 a usage error.

L{judge} (the verdict rules) and the rendering are pure functions over a
L{ProbeReport}; L{probe} is the only part that talks to the network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import PrivateCertificate

from smtpproxy.config import system_hostname
from smtpproxy.tools import certs, connect
from smtpproxy.tools.certs import CertInfo, Verification
from smtpproxy.tools.client import ProbeFactory, ProbeProtocol, Transcript
from smtpproxy.tools.dialogue import (
    Capabilities,
    Reply,
    choose_mechanism,
    login_responses,
    parse_ehlo,
    plain_response,
)

__all__ = ["ProbeReport", "Verdict", "judge", "probe", "register", "render_text"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_WARN = 0, 1, 2, 3
#: A certificate expiring sooner than this is a warning.
EXPIRY_WARNING_DAYS = 14

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Step:
    """One timed step: what was done, whether it worked, and what the server said."""

    name: str
    ok: bool
    ms: float
    detail: str


@dataclass(frozen=True, slots=True)
class TLSReport:
    how: str  # "STARTTLS" or "implicit TLS"
    version: str
    cipher: str
    bits: int
    chain: tuple[CertInfo, ...]
    verification: Verification


@dataclass(frozen=True, slots=True)
class AuthReport:
    mechanism: str
    ok: bool
    detail: str


@dataclass
class ProbeReport:
    """Everything the probe learnt; L{judge} reads only this."""

    target: str
    mode: str  # "plain", "starttls" or "tls"
    steps: list[Step] = field(default_factory=list)
    greeting: Reply | None = None
    ehlo: Capabilities | None = None
    ehlo_after_tls: Capabilities | None = None
    tls: TLSReport | None = None
    auth: AuthReport | None = None
    auth_wanted: bool = False
    #: Why the probe stopped early (connect refused, no greeting, ...).
    stopped: str | None = None
    transcript: Transcript = field(default_factory=list)

    @property
    def capabilities(self) -> Capabilities | None:
        """What the server offers on the connection as it ended up (after TLS if any)."""
        return self.ehlo_after_tls or self.ehlo


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # "OK", "WARN" or "FAIL"
    line: str
    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def exit_code(self) -> int:
        return {"OK": EXIT_OK, "WARN": EXIT_WARN}.get(self.status, EXIT_FAIL)


def judge(report: ProbeReport, now: datetime) -> Verdict:
    """The verdict rules: what makes a probe fail, what only warns.

    FAIL: the probe stopped early (no connection, no 220 greeting, EHLO
    refused, STARTTLS asked for but not offered or refused, a failed
    handshake), or AUTH was asked for and did not succeed.
    WARN: the certificate does not verify for the host or expires within
    L{EXPIRY_WARNING_DAYS}; the TLS version is older than 1.2; AUTH is
    offered on a connection without TLS (a client could send its password
    in clear text); no TLS at all, neither asked for nor offered.
    """
    problems: list[str] = []
    warnings: list[str] = []
    if report.stopped is not None:
        problems.append(report.stopped)
    if report.auth_wanted and report.stopped is None:
        if report.auth is None:
            problems.append("AUTH was not tried")
        elif not report.auth.ok:
            problems.append(f"AUTH {report.auth.mechanism} failed: {report.auth.detail}")
    if report.tls is not None:
        tls = report.tls
        if not tls.verification.ok:
            warnings.append(
                f"the certificate does not verify against {tls.verification.trust}: "
                f"{tls.verification.reason}"
            )
        if tls.chain:
            days = tls.chain[0].days_left(now)
            if 0 <= days < EXPIRY_WARNING_DAYS:
                warnings.append(f"the certificate expires in {days:.0f} days")
        if tls.version in ("SSLv3", "TLSv1", "TLSv1.1"):
            warnings.append(f"{tls.version} was negotiated; TLS 1.2 or newer is expected")
    ehlo = report.ehlo
    if ehlo is not None and report.mode == "plain" and report.stopped is None:
        if ehlo.auth:
            warnings.append("AUTH is offered without TLS: passwords could travel in clear text")
        if not ehlo.starttls:
            warnings.append("no STARTTLS: mail travels in clear text")
    if problems:
        return Verdict("FAIL", f"FAIL: {problems[0]}", tuple(problems), tuple(warnings))
    if warnings:
        return Verdict("WARN", f"WARN: {'; '.join(warnings)}", (), tuple(warnings))
    return Verdict("OK", f"OK: {_success(report)}", (), ())


def _success(report: ProbeReport) -> str:
    """One line saying what works."""
    parts = [f"{report.target} answers"]
    if report.greeting is not None and report.greeting.lines:
        parts[0] += f" as {report.greeting.lines[0].split(' ', 1)[0]}"
    if report.tls is not None:
        parts.append(
            f"{report.tls.how} {report.tls.version} with a certificate that verifies "
            f"against {report.tls.verification.trust}"
        )
    if report.auth is not None and report.auth.ok:
        parts.append(f"AUTH {report.auth.mechanism} accepted")
    return ", ".join(parts)


# -- the network side --------------------------------------------------------


class _StopError(Exception):
    """End the probe here; the message says why (it becomes the verdict's reason)."""


@dataclass
class ProbeOptions:
    target: connect.Target
    mode: str
    helo: str
    timeout: float
    ca_file: str | None = None
    user: str | None = None
    password: str | None = None
    insecure_auth: bool = False
    #: How the report names C{ca_file} (the doctor says C{RELAY_CA_FILE}).
    ca_label: str = "--ca-file"
    #: Stop right after the handshake when the chain does not verify, before
    #: AUTH: a client that verifies (the SMTP provider) would not go on.
    require_verified: bool = False
    #: A certificate to show the server (the doctor's RELAY_CLIENT_CERT_FILE).
    client_certificate: PrivateCertificate | None = None


async def probe(reactor: IReactorTime, options: ProbeOptions) -> ProbeReport:
    """Run the probe's steps against C{options.target}; never raises for what the server does."""
    report = ProbeReport(str(options.target), options.mode, auth_wanted=options.user is not None)
    protocol: ProbeProtocol | None = None
    try:
        protocol = await _steps(reactor, options, report)
    except _StopError as e:
        report.stopped = str(e)
    finally:
        if protocol is not None:
            report.transcript = protocol.transcript
            if protocol.transport is not None:
                protocol.tcp.loseConnection()
    return report


async def _steps(
    reactor: IReactorTime, options: ProbeOptions, report: ProbeReport
) -> ProbeProtocol:
    timed = _Timer(reactor, options.timeout, report)
    implicit = options.mode == "tls"
    creator = (
        connect.observing_tls(options.target.host, options.client_certificate) if implicit else None
    )
    where = connect.endpoint(reactor, options.target, options.timeout, creator)
    factory = ProbeFactory()
    connected = cast("Deferred[ProbeProtocol]", where.connect(factory))
    protocol = await timed("connect", connected, lambda p: str(options.target))
    handshake = protocol.expect_handshake() if implicit else None
    try:
        if handshake is not None:
            facts = await timed(
                "tls",
                handshake,
                _facts_line,
                failed="TLS handshake failed (a plain or STARTTLS port? try --starttls)",
            )
            report.tls = _tls_report("implicit TLS", facts, options)
            _insist_verified(report.tls, options)
        greeting = await timed(
            "greeting",
            protocol.next_reply(),
            _reply_line,
            failed="no greeting" if implicit else "no greeting (an implicit-TLS port? try --tls)",
        )
        report.greeting = greeting
        if greeting.code != 220:
            raise _StopError(f"the server greeted with {greeting.code} {greeting.text}")
        report.ehlo = await _ehlo(protocol, timed, options.helo, "ehlo")
        if options.mode == "starttls":
            if not report.ehlo.starttls:
                raise _StopError("STARTTLS was asked for but the server does not offer it")
            reply = await timed("starttls", protocol.command("STARTTLS"), _reply_line)
            if reply.code != 220:
                raise _StopError(f"STARTTLS refused: {reply.code} {reply.text}")
            creator = connect.observing_tls(options.target.host, options.client_certificate)
            facts = await timed(
                "tls", protocol.start_tls(creator), _facts_line, failed="TLS handshake failed"
            )
            report.tls = _tls_report("STARTTLS", facts, options)
            _insist_verified(report.tls, options)
            report.ehlo_after_tls = await _ehlo(protocol, timed, options.helo, "ehlo")
        if options.user is not None:
            report.auth = await _auth(protocol, timed, report, options)
        with contextlib.suppress(_StopError):  # the report is complete; a lost QUIT is no news
            await timed("quit", protocol.command("QUIT"), _reply_line)
    except BaseException:
        protocol.tcp.loseConnection()
        raise
    return protocol


async def _ehlo(protocol: ProbeProtocol, timed: _Timer, helo: str, name: str) -> Capabilities:
    reply = await timed(name, protocol.command(f"EHLO {helo}"), _reply_line)
    if reply.code != 250:
        raise _StopError(f"EHLO refused: {reply.code} {reply.text}")
    return parse_ehlo(reply.lines)


async def _auth(
    protocol: ProbeProtocol, timed: _Timer, report: ProbeReport, options: ProbeOptions
) -> AuthReport:
    offered = report.capabilities.auth if report.capabilities else ()
    mechanism = choose_mechanism(offered)
    if mechanism is None:
        shown = " ".join(offered) or "none"
        hint = ""
        if report.tls is None and report.ehlo is not None and report.ehlo.starttls:
            hint = "; servers often offer AUTH only after STARTTLS: add --starttls"
        raise _StopError(f"AUTH: the server offers no PLAIN or LOGIN (offered: {shown}){hint}")
    if report.tls is None and not options.insecure_auth:
        raise _StopError(
            "AUTH: not sending a password without TLS (use --starttls or --tls, "
            "or --insecure-auth on a network you trust)"
        )
    user, password = options.user or "", options.password or ""
    if mechanism == "PLAIN":
        line = f"AUTH PLAIN {plain_response(user, password).decode('ascii')}"
        reply = await timed("auth", protocol.command(line), _reply_line)
    else:
        first, second = login_responses(user, password)
        reply = await timed("auth", protocol.command("AUTH LOGIN"), _reply_line)
        for answer in (first, second):
            if reply.code != 334:
                break
            reply = await timed("auth", protocol.command(answer.decode("ascii")), _reply_line)
    return AuthReport(mechanism, reply.code == 235, f"{reply.code} {reply.text}")


def _tls_report(how: str, facts: connect.TLSFacts | None, options: ProbeOptions) -> TLSReport:
    if facts is None:
        raise _StopError("the TLS handshake gave no session to report on")
    ca = connect.ca_certificates(options.ca_file)
    verification = certs.verify(
        facts.chain,
        options.target.host,
        ca=ca,
        ca_name=options.ca_file or "",
        ca_label=options.ca_label,
    )
    chain = tuple(certs.describe(c) for c in facts.chain)
    return TLSReport(how, facts.version, facts.cipher, facts.bits, chain, verification)


def _insist_verified(tls: TLSReport, options: ProbeOptions) -> None:
    """End the probe when verification is required and the chain does not verify."""
    if options.require_verified and not tls.verification.ok:
        raise _StopError(
            f"the certificate does not verify against {tls.verification.trust}: "
            f"{tls.verification.reason}"
        )


def _reply_line(reply: Reply) -> str:
    """The first line of a reply, and how many more there were (the EHLO list is shown apart)."""
    more = len(reply.lines) - 1
    return f"{reply.code} {reply.lines[0] if reply.lines else ''}" + (
        f" (+{more} lines)" if more else ""
    )


def _facts_line(facts: connect.TLSFacts | None) -> str:
    if facts is None:
        return ""
    return f"{facts.version} {facts.cipher} ({facts.bits} bits)"


class _Timer:
    """Runs one step with the timeout, records it, and turns a failure into L{_StopError}."""

    def __init__(self, reactor: IReactorTime, timeout: float, report: ProbeReport) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._report = report

    async def __call__(
        self,
        name: str,
        waiting: Deferred[T],
        describe: Callable[[T], str],
        *,
        failed: str | None = None,
    ) -> T:
        started = time.perf_counter()
        waiting.addTimeout(self._timeout, self._reactor)
        try:
            result = await waiting
        except Exception as e:
            ms = (time.perf_counter() - started) * 1000
            why = connect.describe_error(e, self._timeout)
            self._report.steps.append(Step(name, False, ms, why))
            raise _StopError(f"{failed or name}: {why}") from None
        ms = (time.perf_counter() - started) * 1000
        reply_ok = not isinstance(result, Reply) or result.positive
        self._report.steps.append(Step(name, reply_ok, ms, describe(result)))
        return result


# -- output ------------------------------------------------------------------


def render_text(report: ProbeReport, verdict: Verdict, now: datetime, verbose: bool) -> str:
    """The human report: steps with times, capabilities, TLS and chain, the verdict last."""
    mode = connect.MODES[report.mode]
    lines = [f"smtpproxy probe {report.target} ({mode})"]
    for step in report.steps:
        mark = " " if step.ok else "!"
        lines.append(f" {mark}{step.name:<10} {step.ms:8.1f} ms  {step.detail}")
    for label, caps in (("offers", report.ehlo), ("after TLS", report.ehlo_after_tls)):
        if caps is not None:
            lines.append(f"{label}: {', '.join(caps.summary()) or '(no extensions)'}")
    if report.tls is not None:
        tls = report.tls
        state = "verifies" if tls.verification.ok else "does NOT verify"
        lines.append(
            f"certificate chain ({len(tls.chain)}): {state} for {report.target.rsplit(':', 1)[0]}"
            f" against {tls.verification.trust}"
            + (f": {tls.verification.reason}" if not tls.verification.ok else "")
        )
        for number, cert in enumerate(tls.chain, 1):
            lines.append(f"  #{number} subject {cert.subject}")
            if cert.names:
                lines.append(f"     names   {', '.join(cert.names)}")
            lines.append(f"     issuer  {cert.issuer}")
            lines.append(
                f"     valid   {cert.not_before:%Y-%m-%d} to {cert.not_after:%Y-%m-%d} "
                f"({cert.days_left(now):.0f} days left)"
            )
            lines.append(f"     key     {cert.key}, SHA-256 {cert.sha256}")
    if verbose and report.transcript:
        lines.append("transcript:")
        lines += [f"  {'C:' if who == 'C' else 'S:'} {text}" for who, text in report.transcript]
    lines.extend(f"  problem: {p}" for p in verdict.problems[1:])
    lines.append(verdict.line)
    return "\n".join(lines) + "\n"


def _maybe(capabilities: Capabilities | None) -> dict[str, object] | None:
    return None if capabilities is None else capabilities.as_json()


def render_json(report: ProbeReport, verdict: Verdict, now: datetime) -> str:
    """The report as one JSON document (the same facts as the text, for scripts)."""
    tls = report.tls
    document = {
        "target": report.target,
        "mode": report.mode,
        "steps": [
            {"step": s.name, "ok": s.ok, "ms": round(s.ms, 3), "detail": s.detail}
            for s in report.steps
        ],
        "greeting": None
        if report.greeting is None
        else {"code": report.greeting.code, "lines": list(report.greeting.lines)},
        "ehlo": _maybe(report.ehlo),
        "ehlo_after_tls": None
        if report.ehlo_after_tls is None
        else report.ehlo_after_tls.as_json(),
        "tls": None
        if tls is None
        else {
            "how": tls.how,
            "version": tls.version,
            "cipher": tls.cipher,
            "bits": tls.bits,
            "verified": tls.verification.ok,
            "trust": tls.verification.trust,
            "verify_error": tls.verification.reason or None,
            "chain": [c.as_json(now) for c in tls.chain],
        },
        "auth": None
        if report.auth is None
        else {
            "mechanism": report.auth.mechanism,
            "ok": report.auth.ok,
            "reply": report.auth.detail,
        },
        "transcript": [{"from": who, "line": text} for who, text in report.transcript],
        "verdict": {
            "status": verdict.status,
            "line": verdict.line,
            "problems": list(verdict.problems),
            "warnings": list(verdict.warnings),
        },
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# -- the command -------------------------------------------------------------


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add C{probe} to the C{smtpproxy} command's subcommands."""
    parser = commands.add_parser(
        "probe",
        # No abbreviations: "--password" must not quietly mean --password-file.
        allow_abbrev=False,
        help="connect to an SMTP server and report what it offers and whether it works",
        description=(
            "Connect to HOST[:PORT] (port 25, or 465 with --tls), report the greeting, "
            "the EHLO capabilities, TLS and the certificate chain, optionally test AUTH, "
            "and end with one verdict line.  Exit status: 0 OK, 3 WARN, 1 FAIL, 2 usage."
        ),
    )
    parser.add_argument("server", metavar="HOST[:PORT]")
    connect.add_connection_arguments(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also print the dialogue (passwords hidden)"
    )
    parser.set_defaults(run=main)


def main(arguments: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run C{smtpproxy probe} from parsed arguments; the exit status."""
    out = out or sys.stdout
    mode = "tls" if arguments.tls else "starttls" if arguments.starttls else "plain"
    try:
        target = connect.parse_target(arguments.server, implicit_tls=mode == "tls")
        password = connect.read_password(arguments.user, arguments.password_file)
        if arguments.ca_file is not None:
            connect.ca_certificates(arguments.ca_file)
    except connect.UsageError as e:
        sys.stderr.write(f"smtpproxy probe: {e}\n")
        return EXIT_USAGE
    options = ProbeOptions(
        target=target,
        mode=mode,
        helo=arguments.helo or system_hostname(socket.getfqdn)[0],
        timeout=arguments.timeout,
        ca_file=arguments.ca_file,
        user=arguments.user,
        password=password,
        insecure_auth=arguments.insecure_auth,
    )
    result: list[int] = []

    async def run(reactor: IReactorTime) -> None:
        report = await probe(reactor, options)
        now = certs.now_utc()
        verdict = judge(report, now)
        if arguments.json:
            out.write(render_json(report, verdict, now))
        else:
            out.write(render_text(report, verdict, now, arguments.verbose))
        out.flush()
        result.append(verdict.exit_code)

    connect.react(run)
    return result[0] if result else EXIT_FAIL
