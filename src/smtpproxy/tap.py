"""The twistd plugin: command-line options and the service tree.

C{postOptions} does every check that can fail (settings, certificate files,
provider name) so that a bad setting stops twistd before it forks or binds,
with one line naming what is wrong.  C{makeService} only assembles objects.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.ssl import CertificateOptions
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from smtpproxy import (
    __version__,
    cli,
    config,
    fdlimit,
    identities,
    jsonlog,
    providers,
    sendas,
    spool,
    tls,
    twisted_private,
)
from smtpproxy.delivery import RelayRealm
from smtpproxy.identities import build as identity_build
from smtpproxy.mime.parsetask import MessageParser
from smtpproxy.policy import rules as policy
from smtpproxy.policy.guard import settings_from as guard_settings
from smtpproxy.queue import backend as queue_backend
from smtpproxy.queue import worker as queue_worker
from smtpproxy.queue.front import QueueFront, route_for
from smtpproxy.queue.store import CounterStore, QueueStore
from smtpproxy.smtp import listeners
from smtpproxy.smtp.factory import RelayFactory
from smtpproxy.smtp.protocol import session_settings
from smtpproxy.smtp.sasl import StaticPasswordChecker
from smtpproxy.web import health, ready
from smtpproxy.web import mailbox as web_mailbox
from smtpproxy.web import metrics as web_metrics
from smtpproxy.web import site as web_site
from smtpproxy.web.api import service as web_api
from smtpproxy.web.api.resource import Api
from smtpproxy.web.status import StatusPoller

log = Logger(namespace="smtpproxy")

#: Seconds the provider gets to close its connections at shutdown.
PROVIDER_CLOSE_TIMEOUT = 2.0
#: Seconds the HTTP connections get, at the end of the stop, to send what was
#: written to them (a client that does not read is then cut off).
HTTP_FLUSH_TIMEOUT = 1.0


def _settings_help() -> str:
    # twistd reflows longdesc into one paragraph, so the settings table is
    # printed by --help-settings (and `smtpproxy settings`) instead.
    return (
        "smtpproxy relays SMTP mail to Microsoft Graph, or prints it to stdout when "
        "Graph is not configured.  Settings come from environment variables, over an "
        f"optional YAML file (--config or {config.CONFIG_FILE_ENV}).  "
        "List them, one per line, with: twistd smtpproxy --help-settings "
        "(or: smtpproxy settings)."
    )


class Options(usage.Options):
    """C{twistd smtpproxy} options: only the config file; the rest is environment."""

    synopsis = "[--config FILE]"
    optParameters: ClassVar[list[list[str | None]]] = [
        ["config", "c", None, f"YAML settings file (default: ${config.CONFIG_FILE_ENV})"],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self.longdesc = _settings_help()

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"smtpproxy {__version__}")
        sys.exit(0)

    def opt_help_settings(self) -> None:
        """Print every setting (variable, YAML path, default, meaning) and exit."""
        sys.stdout.write(cli.settings_text())
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            twisted_private.check()
        except twisted_private.TwistedChangedError as e:
            raise SystemExit(f"smtpproxy: {e}") from None
        path = self["config"] or self.environ.get(config.CONFIG_FILE_ENV) or None
        text: str | None = None
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise SystemExit(f"smtpproxy: config file {path}: {_why(e)}") from None
        try:
            settings = config.load(self.environ, text, yaml_source=path or "config file")
        except config.ConfigError as e:
            raise SystemExit(f"smtpproxy: {e}") from None
        if settings.provider not in providers.names():
            raise SystemExit(
                f"smtpproxy: PROVIDER: unknown provider {settings.provider!r}; "
                f"choose one of {', '.join(providers.names())}"
            )
        specs = _listeners(settings)
        try:
            cert_file, key_file = listeners.certificate_files(
                settings.tls_cert_file, settings.tls_key_file, specs
            )
        except listeners.ListenError as e:
            raise SystemExit(f"smtpproxy: {e}") from None
        try:
            if cert_file:
                cert, key = tls.load_files(cert_file, key_file)
                source = f"TLS_CERT_FILE {cert_file!r}"
            else:
                cert, key = tls.self_signed(settings.smtp_hostname)
                source = "the generated certificate"
            context = tls.server_context(cert, key, source)
        except tls.TLSConfigError as e:
            raise SystemExit(f"smtpproxy: {e}") from None
        _check_spool_dir(settings.smtp_spool_dir)
        try:
            self["fd_limit"] = fdlimit.ensure(
                settings.smtp_max_connections, settings.http_max_connections
            )
        except fdlimit.FdLimitError as e:
            raise SystemExit(f"smtpproxy: {e}") from None
        self["http_tls_context"] = _http_tls(settings)
        try:
            queue_backend.check(settings.queue_url)
        except ValueError as e:
            raise SystemExit(f"smtpproxy: QUEUE_URL: {e}") from None
        self["identities"] = _identities(settings, self.environ)
        # The submission API's keys: a keys file that cannot be read stops here.
        try:
            self["api_keys"] = web_api.load_keys(settings)
        except (OSError, UnicodeDecodeError) as e:
            where = f"HTTP_API_KEYS_FILE {settings.http_api_keys_file}"
            raise SystemExit(f"smtpproxy: {where}: {_why(e)}") from None
        except ValueError as e:
            raise SystemExit(f"smtpproxy: {e}") from None
        self["settings"] = settings
        self["listeners"] = specs
        self["custom_certificate"] = bool(cert_file)
        self["certificate"] = (cert, key)
        self["tls_context"] = context


def _identities(
    settings: config.Config, environ: Mapping[str, str]
) -> identities.IdentityChecker | None:
    """The AUTH_CONFIG checker (built now, so a bad file stops start-up), or None."""
    from twisted.internet import reactor

    builtin = (settings.smtp_username, settings.smtp_password) if settings.smtp_username else None
    try:
        checker = identity_build.from_settings(settings.auth_config, environ, builtin, reactor)
    except identities.IdentityConfigError as e:
        raise SystemExit(f"smtpproxy: {e}") from None
    if checker is not None:
        # A policy's mailbox must be one the provider can send as.
        problem = sendas.unknown_mailbox(checker.mailboxes(), settings)
        if problem is not None:
            raise SystemExit(f"smtpproxy: AUTH_CONFIG {settings.auth_config}: {problem}")
    return checker


def _http_tls(settings: config.Config) -> CertificateOptions | None:
    """The TLS context for HTTPS on C{HTTP_LISTEN}, or None for plain HTTP."""
    if not settings.http_tls_cert_file or not settings.http_listen:
        return None
    try:
        cert, key = tls.load_files(settings.http_tls_cert_file, settings.http_tls_key_file)
        return tls.server_context(cert, key, f"HTTP_TLS_CERT_FILE {settings.http_tls_cert_file!r}")
    except tls.TLSConfigError as e:
        # tls names the SMTP settings in its messages; these are the HTTP ones.
        text = re.sub(r"(?<!HTTP_)\bTLS_(CERT|KEY)_FILE", r"HTTP_TLS_\1_FILE", str(e))
        raise SystemExit(f"smtpproxy: {text}") from None


def _listeners(settings: config.Config) -> list[listeners.Listener]:
    """The SMTP listeners the settings ask for, or one line saying what is wrong."""
    wanted = [("SMTP_LISTEN", settings.smtp_listen, False)]
    if settings.smtps_listen:
        wanted.append(("SMTPS_LISTEN", settings.smtps_listen, True))
    specs = []
    for setting, value, implicit_tls in wanted:
        try:
            specs.append(listeners.plan(setting, value, implicit_tls=implicit_tls))
        except listeners.ListenError as e:
            raise SystemExit(f"smtpproxy: {setting}: {e}") from None
    return specs


def _check_spool_dir(directory: str) -> None:
    """Large bodies go to this directory: find out now, not at the first big message."""
    try:
        spool.open_spool_file(directory or None).close()
    except OSError as e:
        where = directory or "the system temp directory"
        raise SystemExit(
            f"smtpproxy: SMTP_SPOOL_DIR: cannot create files in {where}: {_why(e)}"
        ) from None


def _queue_kind(url: str) -> str:
    """C{"sqlite"}, C{"postgresql"} or empty, for the start-up line."""
    scheme = url.partition(":")[0].lower() if url else ""
    return "postgresql" if scheme.startswith("postgres") else scheme


def _why_failed(failure: Failure) -> str:
    error = failure.value
    return _why(error) if isinstance(error, Exception) else repr(error)


def _why(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return "not readable as UTF-8 text" if isinstance(error, UnicodeDecodeError) else str(error)


class RelayService(MultiService):
    """Runs the listeners and shuts them down in the order mail needs.

    Stop: refuse new connections at once, let transactions in flight finish
    (bounded), then close the provider and finally the health endpoint, which
    reports "stopping" throughout so orchestrators stop routing to us.
    """

    def __init__(
        self,
        settings: config.Config,
        factory: RelayFactory,
        provider: providers.Provider,
        observer: ILogObserver,
        tls_summary: str,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.factory = factory
        self.provider = provider
        self.observer = observer
        self.tls_summary = tls_summary
        self.stopping = False
        self._bound = False
        self.smtp: IService | None = None
        self.smtps: IService | None = None
        self.http: IService | None = None
        self.http_connections: web_site.ConnectionCap | None = None
        # Queue mode (QUEUE_URL set): the store, opened at start, and the
        # worker delivering from it, started once the store is open.
        self.store: QueueStore | None = None
        self.front: QueueFront | None = None
        self.runner: queue_worker.QueueRunner | None = None
        self.queue_open = False
        # The HTTP side: the metrics, counting log events while running,
        # and the poller behind /readyz and the queue's gauges.
        self.metrics: web_metrics.Metrics | None = None
        self.poller: StatusPoller | None = None
        # AUTH_CONFIG's backends: their kept-alive connections (HTTP auth
        # endpoints, the JWKS) are closed at the stop, not left to the exit.
        self.identities: identities.IdentityChecker | None = None
        # The submission API, when HTTP_LISTEN is set: drained at the stop.
        self.api: Api | None = None

    def setServiceParent(self, parent: object) -> None:
        super().setServiceParent(parent)
        # twistd's AppLogger asks the application for an ILogObserver before
        # it falls back to its own file logger: ours writes JSON to stderr,
        # leaving stdout to the stdout provider.
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:
            set_component(ILogObserver, self.observer)

    def _log_start(self) -> None:
        s = self.settings
        log.info(
            "smtpproxy started",
            version=__version__,
            provider=self.provider.name,
            smtp_listen=s.smtp_listen,
            smtps_listen=s.smtps_listen or None,
            http_listen=s.http_listen or None,
            hostname=s.smtp_hostname,
            auth="enabled" if s.auth_enabled else "disabled",
            insecure_auth=s.smtp_allow_insecure_auth,
            tls=self.tls_summary,
            max_message_size=s.smtp_max_message_size,
            allowed_networks=[str(n) for n in s.allowed_networks],
            trusted_networks=[str(n) for n in s.smtp_trusted_networks],
            queue=_queue_kind(s.queue_url) or None,
        )
        if not s.auth_enabled and policy.is_public_exposure(s.allowed_networks):
            log.warn(
                "open relay: clients from public networks may send without AUTH; "
                "set SMTP_USERNAME/SMTP_PASSWORD or narrow SMTP_ALLOWED_NETWORKS",
                allowed_networks=[str(n) for n in s.allowed_networks],
            )
        for setting, detail in s.startup_warnings:
            log.warn("setting replaced by a fallback", setting=setting, detail=detail)
        if self.provider.name == "stdout":
            log.info("stdout mode: messages are printed, not sent (set GRAPH_* to send mail)")

    def privilegedStartService(self) -> None:
        self._bind()

    def startService(self) -> None:
        if not self._bound:
            self._bind()
        super().startService()
        if self.metrics is not None:
            globalLogPublisher.addObserver(self.metrics.observer)
        if self.poller is not None:
            self.poller.start()
        self._log_start()
        from twisted.internet import reactor

        reactor.addSystemEventTrigger("after", "startup", _stop_cleanly_on_signals)
        if self.store is not None:
            self._open_queue(self.store)

    def _open_queue(self, store: QueueStore) -> None:
        """Open the store; then accept mail into it and start the worker, or exit.

        A message finished before the store is open waits for it (the
        first milliseconds after start); a store that cannot be opened
        stops the relay with one line and exit status 1, as a bad setting
        does, and such a waiting message hears 451.
        """
        from twisted.internet import reactor

        def opened(_: None) -> None:
            self.queue_open = True
            if self.front is not None:
                self.front.opened()
            if self.runner is not None and not self.stopping:
                self.runner.startService()

        def failed(failure: Failure) -> None:
            sys.stderr.write(
                f"smtpproxy: QUEUE_URL: cannot open the queue: {_why_failed(failure)}\n"
            )
            sys.stderr.flush()
            self.store = None
            if self.front is not None:
                self.front.open_failed()
            reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            reactor.stop()

        store.open().addCallbacks(opened, failed)

    def _bind(self) -> None:
        # Binding happens before twistd drops privileges or starts logging;
        # a port in use must stop the process with one clear line, not a
        # traceback and not a relay that runs without its listener.  The
        # listeners come from strports.service, which makes a listen failure
        # raise here rather than only be logged.
        self._bound = True
        children = (
            (self.smtp, "SMTP_LISTEN"),
            (self.smtps, "SMTPS_LISTEN"),
            (self.http, "HTTP_LISTEN"),
        )
        for child, setting in children:
            if child is None:
                continue
            try:
                child.privilegedStartService()
            except Exception as e:
                raise SystemExit(f"smtpproxy: {setting}: cannot listen: {e}") from None

    async def _stop(self) -> None:
        self.stopping = True
        log.info("shutting down: no new connections, finishing messages in flight")
        # The HTTP submissions as the SMTP sessions: new ones refused (503)
        # from now on, those in flight waited for in the same bound.
        timeout = self.settings.smtp_shutdown_timeout
        grace = self.settings.smtp_shutdown_handover_grace
        api_drained = self.api.submitter.flights.drain(timeout, grace) if self.api else None
        for listener in (self.smtp, self.smtps):
            if listener is not None:
                await defer.maybeDeferred(listener.stopService)
        await self.factory.shutdown(timeout)
        if api_drained is not None:
            await api_drained
        if self.runner is not None and self.runner.running:
            # Deliveries in flight finish (bounded), the rest stay queued.
            await self.runner.stopService()
        # A provider whose connections do not close must not hold the stop
        # up either: SIGTERM finishes within SMTP_SHUTDOWN_TIMEOUT + 5 s (more
        # by as much as SMTP_SHUTDOWN_HANDOVER_GRACE passes 1.5 s).
        closing = defer.maybeDeferred(self.provider.close)
        closing.addTimeout(PROVIDER_CLOSE_TIMEOUT, self.factory.reactor)
        # AUTH_CONFIG's backends close alongside (no session is logging in
        # any more), in the same 2 s, so the stop's bound is unchanged.
        closing_identities = self._close_identities()
        try:
            await closing
        except Exception as e:
            log.warn("provider did not close cleanly", error=repr(e))
        await closing_identities
        if self.store is not None:
            try:
                await self.store.close()
            except Exception as e:
                log.warn("queue did not close cleanly", error=repr(e))
        if self.poller is not None:
            self.poller.stop()
        if self.http is not None:
            await defer.maybeDeferred(self.http.stopService)
        if self.http_connections is not None:
            # Answers decided in the last turn (a 202 just committed) are
            # flushed before the reactor's shutdown drops the connections.
            await self.http_connections.close_all(self.factory.reactor, HTTP_FLUSH_TIMEOUT)
        log.info("stopped")
        if self.metrics is not None:
            globalLogPublisher.removeObserver(self.metrics.observer)

    def _close_identities(self) -> defer.Deferred[None]:
        """Close the identity backends' kept-alive connections (bounded; never fails)."""
        if self.identities is None:
            return defer.succeed(None)
        closing = self.identities.close()
        closing.addTimeout(PROVIDER_CLOSE_TIMEOUT, self.factory.reactor)

        def failed(failure: Failure) -> None:
            log.warn("identity backends did not close cleanly", error=repr(failure.value))

        return closing.addErrback(failed)

    def stopService(self) -> defer.Deferred[None]:
        # Children are stopped by _stop in our order, not MultiService's.
        self.running = False
        return defer.Deferred.fromCoroutine(self._stop())


def _stop_cleanly_on_signals() -> None:
    """Stop on SIGTERM (and SIGINT) as the reactor does, but exit with status 0.

    The reactor's own handlers remember the signal, and twistd re-raises it
    once the reactor has stopped, so the exit status reads "killed by
    SIGTERM" however orderly the stop was.  A drained stop is a success and
    supervisors should see it as one.  Where the reactor installed its
    handler (it does so during startup, unless told not to), ours replaces
    it and stops the reactor the same way without remembering the signal.
    """
    from twisted.internet import reactor

    def stop(number: int, frame: object) -> None:
        log.info("signal received, stopping", signal=signal.Signals(number).name)
        # callFromThread, as the reactor's own handler: it wakes the loop.
        IReactorFromThreads(reactor).callFromThread(reactor.stop)

    for number, name in ((signal.SIGTERM, "sigTerm"), (signal.SIGINT, "sigInt")):
        handler = getattr(reactor, name, None)
        if handler is not None and signal.getsignal(number) == handler:
            signal.signal(number, stop)


def _queue(
    settings: config.Config, provider: providers.Provider, parser: MessageParser
) -> tuple[QueueStore | None, QueueFront | None, queue_worker.QueueRunner | None]:
    """Queue mode's store, front door and worker; all None in direct mode."""
    from twisted.internet import reactor

    if not settings.queue_url:
        return None, None, None
    store = queue_backend.make_store(settings.queue_url, settings.queue_max_bytes, reactor)
    keep_counts = getattr(provider, "keep_budgets_in", None)
    if callable(keep_counts) and isinstance(store, CounterStore):
        # Graph's sending budgets live with the queue: kept over restarts, shared by replicas.
        keep_counts(store)
    queue_backend.share_the_gil()
    per_route = providers.mailbox_concurrency(provider)
    runner = queue_worker.QueueRunner(
        store, provider, reactor, parser, queue_worker.settings_from(settings, per_route)
    )
    route = route_for(providers.mailboxes(provider))
    # Messages finished before the store is open wait for it (see startService).
    front = QueueFront(store, reactor, route, kick=runner.kick, open=False)
    return store, front, runner


def makeService(options: Options) -> RelayService:
    """Assemble the relay from validated options."""
    from twisted.internet import reactor

    settings: config.Config = options["settings"]
    cert, key = options["certificate"]
    observer = jsonlog.make_observer(settings.log_level, sys.stderr)
    provider = providers.create(settings.provider, settings, reactor)

    info = settings.log_level in ("debug", "info")
    parser = MessageParser(reactor, settings.smtp_parse_timeout)
    store, front, runner = _queue(settings, provider, parser)
    realm = RelayRealm(provider, reactor, log_delivered=info, parser=parser, queue=front)
    # AUTH_CONFIG: identities behind the one portal (smtpproxy.identities).
    checker = options.get("identities", None)
    if checker is None and "identities" not in options:
        checker = _identities(settings, os.environ)
    portal = Portal(
        realm
        if checker is None
        else identities.IdentityRealm(realm, reactor, sendas.provider_senders(settings))
    )
    portal.registerChecker(AllowAnonymousAccess())
    if checker is not None:
        portal.registerChecker(checker)
    elif settings.auth_enabled:
        portal.registerChecker(
            StaticPasswordChecker(settings.smtp_username, settings.smtp_password)
        )
    # BINARYMIME only where the provider says it carries binary content.
    session = session_settings(
        settings, getattr(provider, "binary_mime", False), providers.mailboxes(provider)
    )
    if checker is not None:
        session = dataclasses.replace(
            session, auth_users=(*session.auth_users, *checker.login_names())
        )
    metrics = web_metrics.Metrics()
    guard = web_metrics.CountingGuard(guard_settings(settings), reactor, metrics)
    context = options.get("tls_context") or tls.server_context(cert, key)
    factory = RelayFactory(session, portal, context, reactor, guard)
    if runner is not None:
        # Queued bodies read back for delivery share the sessions' memory budget.
        runner.budget = factory.spool.budget
    custom = options.get("custom_certificate", bool(settings.tls_cert_file))
    tls_summary = ("custom " if custom else "self-signed ") + tls.describe(cert)
    service = RelayService(settings, factory, provider, observer, tls_summary)
    service.store, service.front, service.runner = store, front, runner
    service.metrics = metrics
    service.identities = checker

    specs = options.get("listeners") or _listeners(settings)
    for spec in specs:
        # One factory behind every listener: the sessions, the caps and the
        # guard are shared; implicit TLS uses the same context as STARTTLS.
        wrapped = listeners.wrap(spec, factory, context, reactor)
        smtp = strports.service(spec.endpoint, wrapped, reactor)
        smtp.setServiceParent(service)
        if spec.setting == "SMTPS_LISTEN":
            service.smtps = smtp
        else:
            service.smtp = smtp
    if settings.http_listen:
        # The submission API at /v1: one more part of the one bounded site.
        keys = options["api_keys"] if "api_keys" in options else web_api.load_keys(settings)
        api = web_api.make_api(settings, keys, provider, reactor, parser, front, log_delivered=info)
        reactor.addSystemEventTrigger("after", "startup", web_api.reload_on_sighup, reactor, api)
        service.api = api
        v1 = web_site.Mount(
            "/v1", web_site.Switchable(api.resource), max_body=api.settings.json_body_limit
        )
        _http(
            service,
            options.get("http_tls_context"),
            reactor,
            [v1],
            web_mailbox.mount_for(provider, reactor),
        )
    return service


def _http(
    service: RelayService,
    context: CertificateOptions | None,
    reactor: Any,
    more: Sequence[web_site.Mount] = (),
    fallback: web_site.Mount | None = None,
) -> None:
    """The HTTP listener: the probes and the metrics, mounted on one bounded site.

    Another HTTP part (the submission API, the mailbox UI) is one more
    L{web_site.Mount} in C{parts}.
    """
    settings, metrics = service.settings, service.metrics
    assert metrics is not None
    store = service.store
    poller = StatusPoller(
        reactor,
        providers.ready_check(service.provider),
        store.stats if store is not None else None,
        store.writable if store is not None else None,
    )
    service.poller = poller
    metrics.watch_sessions(lambda: len(service.factory.sessions))
    if store is not None:
        metrics.watch_queue(poller)
    fetches = getattr(service.provider, "token_fetches", None)
    if isinstance(fetches, int):
        metrics.watch_token_fetches(lambda: int(getattr(service.provider, "token_fetches", 0)))
    statuses = getattr(service.provider, "request_statuses", None)
    if isinstance(statuses, Mapping):
        metrics.watch_graph_requests(lambda: getattr(service.provider, "request_statuses", {}))

    def listening() -> bool:
        return bool(service.running) and service._bound

    facts = ready.facts_from(
        poller,
        listening,
        lambda: service.stopping,
        (lambda: service.queue_open) if store is not None else None,
        settings.queue_max_bytes,
        ready.room_needed(settings.smtp_max_message_size),
    )
    parts = [
        health.mount(lambda: service.stopping),
        ready.mount(facts),
        web_metrics.mount(metrics),
        *more,
    ]
    bounds = web_site.HttpSettings.from_config(settings)

    def refused(reason: str) -> None:
        metrics.refusal("http", reason)

    site = web_site.build_site(parts, bounds, reactor, refused, fallback)
    factory = web_site.listening_factory(site, bounds, context, reactor, refused)
    http = strports.service(settings.http_listen, factory, reactor)
    http.setServiceParent(service)
    service.http = http
    service.http_connections = factory
