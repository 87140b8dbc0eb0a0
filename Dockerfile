# smtpproxy: an SMTP relay that hands mail to Microsoft Graph (or stdout).
#
#   docker build -t smtpproxy .
#   docker run -p 2525:2525 -p 8080:8080 smtpproxy
#
# Zero settings needed; configure with environment variables (see
# docs/operator-guide.md).  The install steps live in
# scripts/container-install.sh, which tests/test_install.py runs into a fresh
# virtualenv: what this image installs is proven without a Docker engine.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: make the virtualenv ------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
COPY scripts/container-install.sh ./scripts/
RUN sh scripts/container-install.sh /opt/smtpproxy /build

# --- runtime: the virtualenv only, run by an unprivileged user ----------
# Same base image as the build stage, so the venv's interpreter path holds.
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 smtpproxy \
    && useradd --system --uid 10001 --gid smtpproxy --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin smtpproxy
# Owned by root, like the plugin cache built above: the relay writes no file
# at run time (no pidfile, logs on stderr, certificate in memory).
COPY --from=build /opt/smtpproxy /opt/smtpproxy
WORKDIR /srv/smtpproxy
ENV PATH=/opt/smtpproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 2525 8080
# SIGTERM starts the graceful shutdown: new connections are refused, mail in
# flight gets up to SMTP_SHUTDOWN_TIMEOUT (30 s) to finish.  Give `docker
# stop` more than that: `docker stop -t 40`.
STOPSIGNAL SIGTERM
# No curl in slim images: ask /healthz with the standard library.  A refused
# connection or a 503 (shutting down) raises, so python exits non-zero.  Set
# HEALTHCHECK_URL when HTTP_LISTEN is not :8080.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL') or 'http://127.0.0.1:8080/healthz', timeout=4).close()"]
# No pidfile: as PID 1 a stale twistd.pid naming PID 1 would stop a restarted
# container from starting.  Arguments to `docker run` go to the plugin, e.g.
# `docker run smtpproxy --help` or `--config /etc/smtpproxy.yaml`.
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "--umask=0077", "smtpproxy"]
CMD []
