"""C{smtpproxy doctor}: check the relay's own settings before mail is lost.

It reads the settings exactly as C{twistd smtpproxy} does (the environment
over the optional YAML file of C{--config} or C{SMTP_PROXY_CONFIG}, through
L{smtpproxy.config.load}) and runs a list of checks, each reporting PASS,
WARN, FAIL or SKIP with one line of detail:

  - settings: they load at all (a bad value is the first thing to fix);
  - listen: each listen address (C{SMTP_LISTEN}, C{SMTPS_LISTEN},
    C{HTTP_LISTEN}) can be bound, tried and released at once (run it
    while the relay is stopped, or the relay's own ports read as taken);
  - certificate: C{TLS_CERT_FILE} and C{TLS_KEY_FILE} load and pass the
    relay's start-up checks (L{smtpproxy.tls.load_files}), the expiry is
    not near, the names cover C{SMTP_HOSTNAME}; without them, a warning
    that clients which verify will refuse the generated certificate;
  - queue: with C{QUEUE_URL}, the store opens as the relay opens it, takes
    one write (removed again), and its depth and oldest message by state
    are reported, with warnings past thresholds (L{smtpproxy.tools.queuecheck});
  - the provider's own checks (L{PROVIDER_CHECKS}): stdout needs none;
    Graph must hand out a token for the configured credential, and with
    C{--send-test-to ADDRESS} each C{GRAPH_SENDER} mailbox sends one test
    message through the provider's real delivery path; upstream SMTP is
    probed with the provider's TLS and AUTH settings
    (L{smtpproxy.tools.upstreamcheck}).

Exit status: 0 when every check passes (SKIP counts as passing), 3 when
the worst is a warning, 1 when any check fails, 2 for a usage error.

Adding a check: write C{async def check_x(context: Context) -> list[Result]}
and append it to L{CHECKS} (relay-wide, such as the durable queue, which
returns a SKIP when C{QUEUE_URL} is empty) or put it in L{PROVIDER_CHECKS}
under the provider's name.  A check never raises for what it finds; an exception it does
not expect is reported as a FAIL of that check, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from cryptography import x509
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol

from smtpproxy import config, tls
from smtpproxy.smtp import listeners
from smtpproxy.tools import certs, connect

__all__ = ["CHECKS", "PROVIDER_CHECKS", "Context", "Result", "register", "run_checks"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_WARN = 0, 1, 2, 3
#: A configured certificate expiring sooner than this is a warning.
EXPIRY_WARNING_DAYS = 30
STATUSES = ("PASS", "WARN", "FAIL", "SKIP")


@dataclass(frozen=True, slots=True)
class Result:
    """One finding: which check, PASS/WARN/FAIL/SKIP, and one line saying what was seen."""

    check: str
    status: str
    detail: str


@dataclass
class Context:
    """What every check may read: the settings, the reactor, the command's options."""

    config: config.Config
    reactor: Any
    now: datetime
    timeout: float = 30.0
    send_test_to: str | None = None
    source: str = "environment"


Check = Callable[[Context], Awaitable[list[Result]]]


# -- listen addresses ----------------------------------------------------------


async def check_listen(context: Context) -> list[Result]:
    """Bind each configured listen address, then release it at once."""
    settings = context.config
    wanted = [
        ("SMTP_LISTEN", settings.smtp_listen, False),
        ("SMTPS_LISTEN", settings.smtps_listen, True),
        ("HTTP_LISTEN", settings.http_listen, False),
    ]
    results = []
    for name, value, implicit_tls in wanted:
        if not value:
            continue
        try:
            where = (
                listeners.plan(name, value, implicit_tls=implicit_tls).endpoint
                if name != "HTTP_LISTEN"
                else value
            )
        except listeners.ListenError as e:
            results.append(Result("listen", "FAIL", f"{name} {value}: {e}"))
            continue
        results.append(await _try_bind(context, name, value, where))
    return results


async def _try_bind(context: Context, name: str, value: str, where: str) -> Result:
    """Listen on C{where} (C{value} as configured, for the report) and stop at once."""
    if where.startswith("systemd:"):
        return Result("listen", "SKIP", f"{name} {value}: handed over by systemd, not bound here")
    endpoint = serverFromString(context.reactor, where)  # type: ignore[no-untyped-call]
    try:
        port = await endpoint.listen(Factory.forProtocol(Protocol))
    except Exception as e:
        why = connect.describe_error(e, context.timeout)
        if "in use" in why:
            why += " (is the relay, or another server, running? stop it to check this)"
        return Result("listen", "FAIL", f"{name} {value}: cannot listen: {why}")
    await port.stopListening()
    return Result("listen", "PASS", f"{name} {value} can be bound")


# -- certificate ---------------------------------------------------------------


async def check_certificate(context: Context) -> list[Result]:
    """The configured certificate as the relay would load it, plus expiry and names."""
    settings = context.config
    try:
        specs = [listeners.plan("SMTP_LISTEN", settings.smtp_listen)]
        if settings.smtps_listen:
            specs.append(listeners.plan("SMTPS_LISTEN", settings.smtps_listen, implicit_tls=True))
        cert_file, key_file = listeners.certificate_files(
            settings.tls_cert_file, settings.tls_key_file, specs
        )
    except listeners.ListenError as e:
        return [Result("certificate", "FAIL", str(e))]
    if not cert_file:
        return [
            Result(
                "certificate",
                "WARN",
                "no TLS_CERT_FILE: a self-signed certificate is made at each start; clients "
                "that verify certificates will refuse it (fine for clients that do not)",
            )
        ]
    try:
        cert_pem, key_pem = tls.load_files(cert_file, key_file, now=context.now)
        tls.server_context(cert_pem, key_pem, f"TLS_CERT_FILE {cert_file!r}")
    except tls.TLSConfigError as e:
        return [Result("certificate", "FAIL", str(e))]
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    info = certs.describe(leaf)
    days = info.days_left(context.now)
    shown = f"{info.subject}, {info.key}, expires {info.not_after:%Y-%m-%d}"
    results = [Result("certificate", "PASS", f"{cert_file}: {shown}")]
    if days < EXPIRY_WARNING_DAYS:
        results.append(
            Result("certificate", "WARN", f"{cert_file}: expires in {days:.0f} days; renew it")
        )
    hostname = settings.smtp_hostname
    try:
        verify_certificate_hostname(leaf, hostname)
    except (VerificationError, CertificateError):
        names = ", ".join(info.names) or "no DNS names"
        results.append(
            Result(
                "certificate",
                "WARN",
                f"{cert_file}: not valid for SMTP_HOSTNAME {hostname} (it names {names}); "
                "clients that dial that name will refuse it",
            )
        )
    return results


# -- providers -----------------------------------------------------------------


async def check_provider(context: Context) -> list[Result]:
    """Run the checks of the configured provider (L{PROVIDER_CHECKS})."""
    name = context.config.provider
    check = PROVIDER_CHECKS.get(name)
    if check is None:
        return [Result("provider", "SKIP", f"{name}: no checks for this provider yet")]
    return await check(context)


async def check_stdout(context: Context) -> list[Result]:
    return [Result("provider", "PASS", "stdout: mail is printed on standard output")]


async def check_queue(context: Context) -> list[Result]:
    """The durable queue (C{QUEUE_URL}): opens, takes a write, depth and age by state."""
    from smtpproxy.tools import queuecheck

    return await queuecheck.check(context)


async def check_upstream(context: Context) -> list[Result]:
    """The upstream SMTP server: reachable, TLS verifies, AUTH works, what EHLO offers."""
    from smtpproxy.tools import upstreamcheck

    return await upstreamcheck.check(context)


async def check_graph(context: Context) -> list[Result]:
    """A token for the configured credential; with --send-test-to, one send per mailbox."""
    from smtpproxy.tools import graphcheck

    return await graphcheck.check(context)


#: Relay-wide checks, in the order they run and are reported.
CHECKS: list[tuple[str, Check]] = [
    ("listen", check_listen),
    ("certificate", check_certificate),
    ("queue", check_queue),
    ("provider", check_provider),
]

#: Each provider's checks, by the provider's name (C{PROVIDER}).
PROVIDER_CHECKS: dict[str, Check] = {
    "stdout": check_stdout,
    "graph": check_graph,
    "smtp": check_upstream,
}


async def run_checks(
    context: Context, checks: list[tuple[str, Check]] | None = None
) -> list[Result]:
    """Every check in turn; one that raises is a FAIL of that check, not the end."""
    results = [
        Result(
            "settings", "PASS", f"read from {context.source}; provider {context.config.provider}"
        )
    ]
    for name, check in checks if checks is not None else CHECKS:
        try:
            results += await check(context)
        except Exception as e:
            results.append(
                Result(name, "FAIL", f"the check itself failed: {type(e).__name__}: {e}")
            )
    return results


def exit_code(results: list[Result]) -> int:
    statuses = {r.status for r in results}
    if "FAIL" in statuses:
        return EXIT_FAIL
    return EXIT_WARN if "WARN" in statuses else EXIT_OK


def summary(results: list[Result]) -> str:
    """The last line: how many checks passed, or the first failure."""
    failed = [r for r in results if r.status == "FAIL"]
    warned = [r for r in results if r.status == "WARN"]
    total = len(results)
    if failed:
        first = failed[0]
        return f"FAIL: {len(failed)} of {total} checks failed; first: {first.check}: {first.detail}"
    if warned:
        return f"WARN: {total - len(warned)} of {total} checks passed, {len(warned)} warned"
    return f"OK: all {len(results)} checks passed"


def render_text(results: list[Result]) -> str:
    lines = ["smtpproxy doctor"]
    lines += [f"  {r.status:<4}  {r.check:<13} {r.detail}" for r in results]
    lines.append(summary(results))
    return "\n".join(lines) + "\n"


def render_json(results: list[Result]) -> str:
    document = {
        "checks": [{"check": r.check, "status": r.status, "detail": r.detail} for r in results],
        "status": {EXIT_OK: "OK", EXIT_WARN: "WARN"}.get(exit_code(results), "FAIL"),
        "line": summary(results),
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# -- the command ---------------------------------------------------------------


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add C{doctor} to the C{smtpproxy} command's subcommands."""
    parser = commands.add_parser(
        "doctor",
        # No abbreviations: "--password" must not quietly mean --password-file.
        allow_abbrev=False,
        help="check the relay's settings: listen addresses, certificate, provider",
        description=(
            "Read the relay's settings as twistd smtpproxy does and check what can go wrong "
            "before mail is lost.  Exit status: 0 all pass, 3 warnings, 1 a failure, 2 usage."
        ),
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"YAML settings file (default: ${config.CONFIG_FILE_ENV})",
    )
    parser.add_argument(
        "--send-test-to",
        metavar="ADDRESS",
        help="also send one test message from each sending mailbox to ADDRESS",
    )
    parser.add_argument(
        "--timeout", metavar="S", type=float, default=30.0, help="seconds per network step"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(run=main)


def load_settings(path: str | None, environ: Mapping[str, str]) -> tuple[config.Config, str]:
    """The settings as the relay reads them, and where they came from.

    @raise config.ConfigError: a setting is wrong, or the file cannot be read.
    """
    path = path or environ.get(config.CONFIG_FILE_ENV) or None
    text = None
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or "not UTF-8 text"
            raise config.ConfigError(f"config file {path}: {why}") from None
    settings = config.load(environ, text, yaml_source=path or "config file")
    return settings, f"the environment and {path}" if path else "the environment"


def main(
    arguments: argparse.Namespace,
    out: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run C{smtpproxy doctor} from parsed arguments; the exit status."""
    out = out or sys.stdout
    environ = os.environ if environ is None else environ
    render = render_json if arguments.json else render_text
    try:
        settings, source = load_settings(arguments.config, environ)
    except config.ConfigError as e:
        results = [Result("settings", "FAIL", str(e))]
        out.write(render(results))
        return EXIT_FAIL
    result: list[int] = []

    async def run(reactor: IReactorTime) -> None:
        context = Context(
            settings,
            reactor,
            certs.now_utc(),
            timeout=arguments.timeout,
            send_test_to=arguments.send_test_to,
            source=source,
        )
        results = await run_checks(context)
        out.write(render(results))
        out.flush()
        result.append(exit_code(results))

    connect.react(run)
    return result[0] if result else EXIT_FAIL
