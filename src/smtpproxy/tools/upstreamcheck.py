"""C{smtpproxy doctor}'s upstream SMTP checks (C{PROVIDER=smtp}): reachable, TLS, AUTH, EHLO.

One connection to C{RELAY_HOST:RELAY_PORT} through the probe's own client
(L{smtpproxy.tools.probe.probe}, so there is one SMTP client for the tools,
not two), set up the way the provider connects:

  - C{RELAY_TLS}: C{starttls} is the probe's STARTTLS mode, C{implicit} its
    implicit TLS, C{none} plain (AUTH then goes in clear, as the provider
    sends it);
  - C{RELAY_TLS_VERIFY} on: the chain must verify against C{RELAY_CA_FILE}
    (or the system's CAs) and name C{RELAY_HOST}, the checks the provider's
    C{optionsForClientTLS} makes; when it does not, the probe stops before
    AUTH, as the provider would, so the password never goes to a server
    that could not be verified.  Off: the result is a warning that says
    whether the certificate would have verified;
  - C{RELAY_CLIENT_CERT_FILE}: shown to the server, as the provider does;
  - C{RELAY_USERNAME} / C{RELAY_PASSWORD}: AUTH PLAIN or LOGIN, whichever
    is offered.  The password is never part of a result.

The results are pure functions of the probe's report (L{results_for}), so
the wording is tested without a server.
"""

from __future__ import annotations

from smtpproxy.config import ConfigError
from smtpproxy.providers.smtp.settings import RelaySettings
from smtpproxy.providers.smtp.trust import client_certificate
from smtpproxy.tools import connect
from smtpproxy.tools.doctor import Context, Result
from smtpproxy.tools.probe import ProbeOptions, ProbeReport, probe

__all__ = ["MODES", "check", "options_for", "results_for"]

#: RELAY_TLS -> the probe's mode.
MODES = {"starttls": "starttls", "implicit": "tls", "none": "plain"}


def options_for(settings: RelaySettings, timeout: float) -> ProbeOptions:
    """The probe's options for the upstream the settings name.

    @raise ConfigError: the client certificate files cannot be used.
    """
    return ProbeOptions(
        target=connect.Target(settings.host, settings.port),
        mode=MODES[settings.tls],
        helo=settings.helo,
        timeout=timeout,
        ca_file=settings.ca_file or None,
        user=settings.username or None,
        password=settings.password or None,
        insecure_auth=settings.tls == "none",
        ca_label="RELAY_CA_FILE",
        require_verified=settings.tls != "none" and settings.tls_verify,
        client_certificate=client_certificate(settings),
    )


async def check(context: Context) -> list[Result]:
    """Probe the configured upstream; one line each for the connection, TLS, AUTH and EHLO."""
    settings = RelaySettings.from_config(context.config)
    try:
        options = options_for(settings, context.timeout)
    except ConfigError as e:
        return [Result("upstream", "FAIL", str(e))]
    report = await probe(context.reactor, options)
    return results_for(report, settings, context.config.smtp_max_message_size)


def results_for(report: ProbeReport, settings: RelaySettings, max_size: int) -> list[Result]:
    """What the probe's report means for the relay, one L{Result} per concern."""
    target = report.target
    if report.ehlo is None:
        # No connection, no greeting, or EHLO refused: nothing else was tried.
        return [Result("upstream", "FAIL", f"{target}: {report.stopped or 'no EHLO reply'}")]
    name = report.greeting.lines[0].split(" ", 1)[0] if report.greeting else "?"
    results = [Result("upstream", "PASS", f"{target} answers as {name}; EHLO accepted")]
    results.append(_tls(report, settings))
    if results[-1].status == "FAIL":
        return results
    results.append(_auth(report, settings))
    results.append(_extensions(report, max_size))
    return results


def _tls(report: ProbeReport, settings: RelaySettings) -> Result:
    if settings.tls == "none":
        return Result(
            "upstream tls",
            "WARN",
            "RELAY_TLS=none: mail (and any password) goes to the upstream in clear text",
        )
    tls = report.tls
    if tls is None:
        return Result("upstream tls", "FAIL", report.stopped or "no TLS session")
    how = f"{tls.how} {tls.version} {tls.cipher}"
    verification = tls.verification
    if not verification.ok:
        if settings.tls_verify:
            return Result("upstream tls", "FAIL", report.stopped or verification.reason)
        return Result(
            "upstream tls",
            "WARN",
            f"{how}; RELAY_TLS_VERIFY=false, so the certificate is not checked (it would not "
            f"verify against {verification.trust}: {verification.reason})",
        )
    if not settings.tls_verify:
        return Result(
            "upstream tls",
            "WARN",
            f"{how}; RELAY_TLS_VERIFY=false, though the certificate verifies against "
            f"{verification.trust}: turn verification on",
        )
    return Result(
        "upstream tls",
        "PASS",
        f"{how}; the certificate verifies for {settings.host} against {verification.trust}",
    )


def _auth(report: ProbeReport, settings: RelaySettings) -> Result:
    if not settings.username:
        return Result("upstream auth", "SKIP", "no RELAY_USERNAME: the relay does not log in")
    auth = report.auth
    if auth is None:
        return Result("upstream auth", "FAIL", report.stopped or "AUTH was not tried")
    if not auth.ok:
        return Result(
            "upstream auth",
            "FAIL",
            f"AUTH {auth.mechanism} as {settings.username} refused: {auth.detail}",
        )
    return Result("upstream auth", "PASS", f"AUTH {auth.mechanism} as {settings.username} accepted")


def _extensions(report: ProbeReport, max_size: int) -> Result:
    """SIZE, 8BITMIME, SMTPUTF8 and PIPELINING as offered on the connection the relay uses."""
    caps = report.capabilities
    if caps is None:  # pragma: no cover - results_for returned before
        return Result("upstream ext", "SKIP", "no EHLO reply")
    size = "no SIZE" if caps.size is None else f"SIZE {caps.size}" if caps.size else "SIZE"
    flags = [size] + [
        f"{word}" if offered else f"no {word}"
        for word, offered in (
            ("8BITMIME", caps.eightbitmime),
            ("SMTPUTF8", caps.smtputf8),
            ("PIPELINING", caps.pipelining),
        )
    ]
    shown = ", ".join(flags)
    problems = []
    if caps.size and caps.size < max_size:
        problems.append(
            f"the upstream takes at most {caps.size} bytes but SMTP_MAX_MESSAGE_SIZE is "
            f"{max_size}: larger messages are accepted here and refused there"
        )
    if not caps.smtputf8:
        problems.append("mail with UTF-8 addresses cannot be relayed")
    if problems:
        return Result("upstream ext", "WARN", f"{shown}; {'; '.join(problems)}")
    return Result("upstream ext", "PASS", shown)
