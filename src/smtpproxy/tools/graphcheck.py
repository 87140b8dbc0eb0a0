"""C{smtpproxy doctor}'s Graph checks: a token, and (when asked) one send per mailbox.

The token request is the provider's own: built by the configured
credential (L{smtpproxy.providers.graph.credentials.credential_for}: secret,
certificate, federated token or managed identity) and read by
L{smtpproxy.providers.graph.tokens} (C{parse_token}, and C{token_problem},
whose AADSTS hints say what to change: a wrong secret, an expired one, an
unknown tenant).  It is sent once, without the provider's retries and
without C{HTTPS_PROXY}: a doctor reports what it sees from this machine.

The send test goes through the real provider (L{GraphProvider.send}) with
a message built like C{smtpproxy send}'s, From each C{GRAPH_SENDER}
mailbox in turn, so it proves the same path a relayed message takes:
token, payload, the mailbox's send-as right.
"""

from __future__ import annotations

import uuid
from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from smtpproxy.errors import DeliveryError
from smtpproxy.mime.message import parse_message
from smtpproxy.providers.graph.credentials import (
    CredentialError,
    credential_for,
    credential_warning,
)
from smtpproxy.providers.graph.provider import USER_AGENT, GraphProvider
from smtpproxy.providers.graph.settings import CREDENTIAL_NAMES, GraphSettings
from smtpproxy.providers.graph.tokens import parse_token, token_problem
from smtpproxy.tools import connect
from smtpproxy.tools.doctor import Context, Result
from smtpproxy.tools.send import MessageSpec, build_message

__all__ = ["check"]


async def check(context: Context) -> list[Result]:
    settings = GraphSettings.from_config(context.config)
    token = await _token(context, settings)
    results = [token, *_credential_warnings(context, settings)]
    mailboxes = ", ".join(settings.sender)
    if token.status != "PASS":
        results.append(Result("graph send", "SKIP", "not tried without a token"))
    elif context.send_test_to is None:
        results.append(
            Result(
                "graph send",
                "SKIP",
                f"not tried: add --send-test-to ADDRESS to send one message from each of "
                f"{mailboxes}",
            )
        )
    else:
        results += await _send_tests(context, settings, context.send_test_to)
    return results


def _credential_warnings(context: Context, settings: GraphSettings) -> list[Result]:
    """A certificate near or past its end, whether or not Entra still took it."""
    try:
        credential = credential_for(settings)
    except CredentialError:
        return []  # the token check has said why
    warning = credential_warning(credential, context.now.timestamp())
    return [] if warning is None else [Result("graph credential", "WARN", warning)]


async def _token(context: Context, settings: GraphSettings) -> Result:
    try:
        wanted = credential_for(settings).token_request(context.now.timestamp())
    except CredentialError as e:
        return Result("graph token", "FAIL", f"the Graph credential cannot be used: {e}")
    url = wanted.url
    headers = {
        # As the provider sends it: Entra's logs find the request by it.
        "client-request-id": str(uuid.uuid4()),
        "return-client-request-id": "true",
        "User-Agent": USER_AGENT,
        **wanted.headers,
    }
    if wanted.content_type:
        headers["Content-Type"] = wanted.content_type
    try:
        response: Any = await treq.request(
            wanted.method,
            url,
            data=wanted.body,
            headers=Headers({k.encode("ascii"): [v.encode("latin-1")] for k, v in headers.items()}),
            timeout=context.timeout,
            reactor=context.reactor,
        )
        body: bytes = await treq.content(response)
    except Exception as e:
        why = connect.describe_error(e, context.timeout)
        return Result("graph token", "FAIL", f"no answer from {_shown(url)}: {why}")
    if response.code == 200:
        try:
            parsed = parse_token(body, 0.0)
        except ValueError as e:
            return Result("graph token", "FAIL", f"{_shown(url)} answered 200 but {e}")
        lifetime = round(parsed.expires_at)
        return Result(
            "graph token",
            "PASS",
            f"{CREDENTIAL_NAMES[settings.credential]}, tenant {settings.tenant_id or '-'}, "
            f"client {settings.client_id or '-'}: token obtained (valid {lifetime} s)",
        )
    problem = token_problem(response.code, body, None, managed=wanted.kind == "managed")
    hint = problem.fields.get("hint")
    detail = problem.summary + (f": {hint}" if hint else "")
    return Result("graph token", "FAIL", detail)


async def _send_tests(context: Context, settings: GraphSettings, to: str) -> list[Result]:
    provider = GraphProvider(context.config, context.reactor)
    results = []
    try:
        for mailbox in settings.sender:
            spec = MessageSpec(
                sender=mailbox,
                to=(to,),
                subject=f"smtpproxy doctor: test message from {mailbox}",
                body=(
                    f"This message was sent by `smtpproxy doctor --send-test-to` to check that "
                    f"the Graph mailbox {mailbox} can send.\n"
                ),
            )
            hostname = mailbox.rpartition("@")[2]
            message = build_message(spec, now=context.now, hostname=hostname)
            email = parse_message(message.envelope_from, message.recipients, message.data)
            sending: Deferred[None] = provider.send(email)
            sending.addTimeout(settings.send_timeout + context.timeout, context.reactor)
            try:
                await sending
            except DeliveryError as e:
                results.append(Result("graph send", "FAIL", f"{mailbox}: {e.reason}"))
            except Exception as e:
                why = connect.describe_error(e, settings.send_timeout)
                results.append(Result("graph send", "FAIL", f"{mailbox}: {why}"))
            else:
                results.append(
                    Result("graph send", "PASS", f"{mailbox}: Graph accepted a message to {to}")
                )
    finally:
        await provider.close()
    return results


def _shown(url: str) -> str:
    """A token URL without its query (a managed identity's may name the client)."""
    return url.split("?", 1)[0]
