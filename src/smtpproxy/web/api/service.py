"""The API assembled from the settings: keys (environment and file), limits, SIGHUP.

L{load_keys} is what start-up calls (a bad keys file stops the relay with
one line, as a bad setting does) and what SIGHUP calls again (a bad file
then leaves the keys in force, with a warning).
"""

from __future__ import annotations

import signal
from functools import partial

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger

from smtpproxy.config import Config
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.providers import Provider
from smtpproxy.queue.front import QueueFront
from smtpproxy.sendas import unknown_mailbox
from smtpproxy.web.api.keys import KeyRing, parse_keys_file
from smtpproxy.web.api.limits import Limits
from smtpproxy.web.api.resource import Api, ApiSettings
from smtpproxy.web.api.submit import Submitter

__all__ = ["load_keys", "make_api", "reload_on_sighup", "settings_from"]

log = Logger(namespace="smtpproxy.http.api")


def settings_from(config: Config) -> ApiSettings:
    return ApiSettings(
        max_message_size=config.smtp_max_message_size,
        max_recipients=config.smtp_max_recipients,
        hostname=config.smtp_hostname or "localhost",
        allowed_senders=config.smtp_allowed_senders,
        allowed_recipients=config.smtp_allowed_recipients,
        log_requests=config.log_level == "debug",
    )


def load_keys(config: Config) -> KeyRing:
    """The keys from C{HTTP_API_KEYS} and, if set, C{HTTP_API_KEYS_FILE}.

    @raise ValueError: a key id in both, or the file's own problem.
    @raise OSError: the file cannot be read.
    """
    keys = list(config.http_api_keys)
    path = config.http_api_keys_file
    if path:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        ids = {key.id for key in keys}
        for key in parse_keys_file(text, f"HTTP_API_KEYS_FILE {path}"):
            if key.id in ids:
                raise ValueError(
                    f"HTTP_API_KEYS_FILE {path}: key id {key.id!r} is also in HTTP_API_KEYS"
                )
            keys.append(key)
        # A key's mailbox must be one the provider can send as (smtpproxy.sendas).
        problem = unknown_mailbox(((f"key {k.id!r}", k.mailbox) for k in keys), config)
        if problem is not None:
            raise ValueError(f"HTTP_API_KEYS_FILE {path}: {problem}")
    return KeyRing(keys)


def make_api(
    config: Config,
    keys: KeyRing,
    provider: Provider,
    reactor: IReactorTime,
    parser: MessageParser,
    queue: QueueFront | None,
    *,
    log_delivered: bool = True,
) -> Api:
    """The API object whose C{resource} the site mounts at C{/v1}."""
    limits = Limits(
        config.http_api_rate_limit_per_min,
        config.http_api_rate_limit_per_ip,
        config.http_api_rate_limit_per_key,
        reactor,
    )
    submitter = Submitter(provider, reactor, parser, queue, log_delivered=log_delivered)
    return Api(
        settings_from(config), keys, limits, submitter, reactor, reload=partial(load_keys, config)
    )


def reload_on_sighup(reactor: IReactorFromThreads, api: Api) -> None:
    """Read the keys again on SIGHUP (twistd leaves SIGHUP alone without a log file).

    The handler only schedules the reload into the reactor's thread: a
    signal handler may run between any two bytecodes of other code.
    """

    def handler(number: int, frame: object) -> None:
        reactor.callFromThread(api.reload_keys)

    signal.signal(signal.SIGHUP, handler)
