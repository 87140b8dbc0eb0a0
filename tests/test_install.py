"""The container image, proven without a Docker engine.

The Dockerfile installs the relay by running C{scripts/container-install.sh}.
L{InstalledRelayTests} runs that same script into a fresh virtualenv, then
starts the installed C{twistd} with the Dockerfile's own ENTRYPOINT and probes
it with the Dockerfile's own HEALTHCHECK command, both read from the
Dockerfile's text, so an edit there is tested here.  L{DockerfileTests} checks
the rest of the image's contract (non-root user, ports, stop signal) from the
same text, and L{OperatorGuideTests} keeps the guide's table of settings in step
with the code.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from smtpproxy.config import CONFIG_FILE_ENV, ENV_PREFIXES, Config, settings
from tests.support import TIMEOUT, message
from tests.test_twistd import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
INSTALL_SCRIPT = ROOT / "scripts" / "container-install.sh"
OPERATOR_GUIDE = ROOT / "docs" / "operator-guide.md"

# Upper bounds for each stage; the whole test normally takes well under a
# minute with a warm pip cache.
VENV_TIMEOUT = 120
INSTALL_TIMEOUT = 600
START_TIMEOUT = 30
STOP_TIMEOUT = 60


# --- reading the Dockerfile --------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as C{(KEYWORD, arguments)}, in order.

    Comment lines are dropped and backslash continuations joined, which is
    all of the Dockerfile syntax the image uses.
    """
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, arguments = whole.partition(" ")
        found.append((keyword.upper(), arguments.strip()))
    return found


def runtime_stage(found: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last stage: the image that actually runs."""
    starts = [i for i, (keyword, _) in enumerate(found) if keyword == "FROM"]
    return list(found[starts[-1] :])


def exec_form(arguments: str) -> list[str]:
    """Parse a JSON exec-form argument list (C{["twistd", ...]})."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def entrypoint(found: Sequence[tuple[str, str]]) -> list[str]:
    [arguments] = [args for keyword, args in runtime_stage(found) if keyword == "ENTRYPOINT"]
    return exec_form(arguments)


def healthcheck(found: Sequence[tuple[str, str]]) -> list[str]:
    [arguments] = [args for keyword, args in runtime_stage(found) if keyword == "HEALTHCHECK"]
    _, cmd, command = arguments.partition("CMD ")
    assert cmd, f"HEALTHCHECK without CMD: {arguments}"
    return exec_form(command)


def environment(found: Sequence[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, arguments in runtime_stage(found):
        if keyword == "ENV":
            for word in shlex.split(arguments):
                name, _, value = word.partition("=")
                values[name] = value
    return values


def read_dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


class DockerfileTests(SynchronousTestCase):
    """The parts of the image's contract that can be read from the Dockerfile alone."""

    def test_runtime_stage(self) -> None:
        """The image runs as a numeric non-root user, exposes SMTP and health ports,
        stops on SIGTERM, starts twistd in the foreground without a pidfile and
        checks health with python's urllib (slim images have no curl)."""
        found = read_dockerfile()
        stage = runtime_stage(found)
        keywords = dict(stage)
        user = keywords["USER"].split(":")[0]
        self.assertTrue(user.isdigit() and int(user) != 0, f"USER {keywords['USER']}")
        self.assertEqual(keywords["EXPOSE"].split(), ["2525", "8080"])
        self.assertEqual(keywords["STOPSIGNAL"], "SIGTERM")
        self.assertEqual(environment(found).get("PYTHONUNBUFFERED"), "1")
        command = entrypoint(found)
        self.assertEqual(command[0], "twistd")
        self.assertIn("--nodaemon", command)
        self.assertIn("--pidfile=", command)
        self.assertEqual(command[-1], "smtpproxy")
        probe = healthcheck(found)
        self.assertEqual(probe[:2], ["python", "-c"])
        self.assertIn("urllib.request", probe[2])
        self.assertIn("http://127.0.0.1:8080/healthz", probe[2])

    def test_build_uses_the_install_script(self) -> None:
        """The build stage installs through scripts/container-install.sh (the script the
        install test runs), and .dockerignore lets in every file the COPY lines name."""
        found = read_dockerfile()
        runs = [args for keyword, args in found if keyword == "RUN"]
        self.assertTrue(any("scripts/container-install.sh" in args for args in runs), runs)
        allowed = {
            line.strip()[1:].rstrip("/")
            for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip().startswith("!")
        }
        for keyword, arguments in found:
            if keyword != "COPY" or arguments.startswith("--from"):
                continue
            *sources, _ = arguments.split()
            for source in sources:
                self.assertIn(source.rstrip("/"), allowed, f"COPY {arguments}")
                self.assertTrue((ROOT / source).exists(), source)


class OperatorGuideTests(SynchronousTestCase):
    """docs/operator-guide.md documents the settings the relay actually has."""

    def test_settings_table_matches_the_code(self) -> None:
        """The guide's table has one row per setting in config.settings(), no more, with the
        YAML path derived from the name and, wherever a default is written as a value,
        that value parsed by the setting equal to the Config default."""
        rows: dict[str, tuple[str, str]] = {}
        for line in OPERATOR_GUIDE.read_text().splitlines():
            match = re.match(r"^\| `([A-Z][A-Z0-9_]*)` \| `([a-z0-9_.]+)` \| ([^|]*) \|", line)
            if match:
                name, path, default = match.groups()
                self.assertNotIn(name, rows, f"{name} is documented twice")
                rows[name] = (path, default.strip())
        self.assertEqual(sorted(rows), sorted(s.env for s in settings()))
        defaults = Config()
        for setting in settings():
            path, written = rows[setting.env]
            self.assertEqual(path, ".".join(setting.yaml_path), setting.env)
            value = re.match(r"^`([^`]*)`", written)
            if value is not None:
                shown = value.group(1)
            elif written.startswith("empty"):
                shown = ""
            else:
                continue  # described in words ("the host's FQDN")
            self.assertEqual(
                setting.parse(shown), getattr(defaults, setting.attr), f"{setting.env}: {written}"
            )


# --- installing and running ----------------------------------------------------


def clean_environment() -> dict[str, str]:
    """The caller's environment without Python overrides or relay settings.

    C{make test} exports C{PYTHONPATH=src}; left in place, the installed
    twistd would find the checkout's plugin instead of the installed one and
    prove nothing.  pip's own settings (index, proxy, certificates) stay.
    """
    names = {s.env for s in settings()} | {CONFIG_FILE_ENV, "HEALTHCHECK_URL"}
    return {
        name: value
        for name, value in os.environ.items()
        if name not in names
        and not name.startswith("PYTHON")
        # pip may need HTTP_PROXY; any other relay-like name would stop the relay.
        and not (name.startswith(ENV_PREFIXES) and name != "HTTP_PROXY")
        and name != "VIRTUAL_ENV"
    }


def index_problem() -> str | None:
    """Why the package index cannot be reached, or None when it can."""
    index = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple/"
    url = index.rstrip("/") + "/twisted/"
    if not url.startswith(("https://", "http://")):
        return None  # a local index: nothing to reach over the network
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    request = urllib.request.Request(url, method="HEAD")  # noqa: S310 (scheme checked above)
    try:
        with urllib.request.urlopen(request, timeout=15, context=context):  # noqa: S310
            return None
    except urllib.error.HTTPError:
        return None  # it answered: the network is there
    except (OSError, ValueError) as e:
        return f"{url}: {e}"


def tail(output: bytes, limit: int = 3000) -> str:
    return output.decode("utf-8", "replace")[-limit:]


class InstalledRelayTests(SynchronousTestCase):
    """scripts/container-install.sh into a fresh venv, then the image's commands."""

    def install(self, venv: Path, env: dict[str, str]) -> None:
        made = subprocess.run(
            [sys.executable, "-m", "venv", str(venv)],
            capture_output=True,
            timeout=VENV_TIMEOUT,
            check=False,
        )
        if made.returncode != 0:
            raise SkipTest(f"cannot create a virtualenv: {tail(made.stderr, 500)}")
        installed = subprocess.run(
            ["sh", str(INSTALL_SCRIPT), str(venv), str(ROOT)],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
        if installed.returncode != 0:
            output = tail(installed.stdout + installed.stderr)
            problem = index_problem()
            if problem is not None:
                raise SkipTest(f"package index unreachable ({problem}); install said:\n{output}")
            self.fail(f"container-install.sh failed ({installed.returncode}):\n{output}")

    def installed_files(self, venv: Path, env: dict[str, str]) -> list[str]:
        listed = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-I",
                "-c",
                "import json, importlib.metadata as m;"
                "print(json.dumps([str(f) for f in m.files('smtpproxy')]))",
            ],
            env=env,
            capture_output=True,
            timeout=TIMEOUT * 3,
            check=True,
        )
        files = json.loads(listed.stdout)
        assert isinstance(files, list)
        return [str(f) for f in files]

    def provider_entry_points(self, venv: Path, env: dict[str, str]) -> dict[str, str]:
        """The installed C{smtpproxy.providers} entry points, name to target."""
        listed = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-I",
                "-c",
                "import json, importlib.metadata as m;"
                "print(json.dumps({e.name: e.value for e in"
                " m.entry_points(group='smtpproxy.providers')}))",
            ],
            env=env,
            capture_output=True,
            timeout=TIMEOUT * 3,
            check=True,
        )
        found = json.loads(listed.stdout)
        assert isinstance(found, dict)
        return {str(k): str(v) for k, v in found.items()}

    def test_install_start_probe_and_stop(self) -> None:
        """The install script yields a venv whose wheel ships only our plugin file in
        twisted/plugins and a prebuilt plugin cache; the Dockerfile's ENTRYPOINT run
        from an empty directory with PYTHONPATH unset relays a message over STARTTLS,
        answers /healthz, passes the Dockerfile's HEALTHCHECK, exits 0 on SIGTERM,
        and writes no file: neither in its working directory nor the plugin cache.
        The `smtpproxy` console script lists the settings."""
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        venv = base / "venv"
        env = clean_environment()
        self.install(venv, env)

        # The wheel: our plugin module, and nothing that would shadow or
        # overwrite Twisted's own package files.
        files = self.installed_files(venv, env)
        self.assertIn("twisted/plugins/smtpproxy_plugin.py", files)
        for theirs in (
            "twisted/__init__.py",
            "twisted/plugins/__init__.py",
            "twisted/plugins/dropin.cache",
        ):
            self.assertNotIn(theirs, files)
        # Every wing is in the wheel, and the providers are entry points.
        wings = (
            "smtp",
            "mime",
            "policy",
            "web",
            "web/mailbox",
            "providers/graph",
            "providers/smtp",
            "providers/mailbox",
        )
        for wing in wings:
            self.assertIn(f"smtpproxy/{wing}/__init__.py", files)
        # The mailbox page's files are package data.
        for name in ("index.html", "mailbox.js", "mailbox.css"):
            self.assertIn(f"smtpproxy/web/mailbox/static/{name}", files)
        self.assertEqual(
            self.provider_entry_points(venv, env),
            {
                "graph": "smtpproxy.providers.graph:create",
                "mailbox": "smtpproxy.providers.mailbox:create",
                "smtp": "smtpproxy.providers.smtp:create",
                "stdout": "smtpproxy.providers.stdout:create",
            },
        )
        [cache] = venv.glob("lib/python*/site-packages/twisted/plugins/dropin.cache")
        cache_before = (cache.stat().st_mtime_ns, cache.read_bytes())

        rundir = base / "rundir"
        rundir.mkdir()
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"

        def installed(program: str, *args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [str(venv / "bin" / program), *args],
                cwd=rundir,
                env=env,
                capture_output=True,
                timeout=TIMEOUT * 3,
                check=False,
            )

        listed = installed("twistd", "--help")
        self.assertTrue(
            re.search(rb"^\s+smtpproxy\s", listed.stdout, re.MULTILINE),
            tail(listed.stdout + listed.stderr),
        )

        # The console script: one line per setting, in the order declared.
        listing = installed("smtpproxy", "settings")
        self.assertEqual(listing.returncode, 0, tail(listing.stderr))
        names = [line.split()[0] for line in listing.stdout.decode().splitlines()[1:]]
        self.assertEqual(names, [s.env for s in settings()])

        found = read_dockerfile()
        command = entrypoint(found)
        command[0] = str(venv / "bin" / command[0])
        smtp_port, http_port = free_port(), free_port()
        relay_env = {
            **env,
            "SMTP_LISTEN": f"127.0.0.1:{smtp_port}",
            "HTTP_LISTEN": f"127.0.0.1:{http_port}",
        }
        relay = subprocess.Popen(
            command,
            cwd=rundir,
            env=relay_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        def kill() -> None:
            if relay.poll() is None:
                relay.kill()
            if relay.stdout is not None and not relay.stdout.closed:
                relay.communicate(timeout=STOP_TIMEOUT)

        self.addCleanup(kill)
        greeting = self.wait_for_greeting(relay, smtp_port)
        self.assertTrue(greeting.startswith(b"220 "), greeting)

        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=TIMEOUT) as client:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            client.starttls(context=context)
            client.sendmail("app@example.com", ["ops@example.org"], message("Installed relay"))

        url = f"http://127.0.0.1:{http_port}/healthz"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            self.assertEqual(response.status, 200)
            self.assertEqual(json.loads(response.read()), {"status": "ok"})

        probe = healthcheck(found)
        probe_env = {**env, "HEALTHCHECK_URL": url}
        healthy = subprocess.run(
            probe, cwd=rundir, env=probe_env, capture_output=True, timeout=TIMEOUT, check=False
        )
        self.assertEqual(healthy.returncode, 0, tail(healthy.stderr))

        relay.send_signal(signal.SIGTERM)
        out, err = relay.communicate(timeout=STOP_TIMEOUT)
        self.assertEqual(relay.returncode, 0, tail(err))
        self.assertIn(b"Installed relay", out)
        events = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
        self.assertIn("smtpproxy started", [e.get("msg") for e in events])

        # With the relay gone the same probe must fail, or it proves nothing.
        unhealthy = subprocess.run(
            probe, cwd=rundir, env=probe_env, capture_output=True, timeout=TIMEOUT, check=False
        )
        self.assertNotEqual(unhealthy.returncode, 0)

        self.assertEqual(sorted(p.name for p in rundir.iterdir()), [])
        self.assertEqual((cache.stat().st_mtime_ns, cache.read_bytes()), cache_before)

    def wait_for_greeting(self, relay: subprocess.Popen[bytes], port: int) -> bytes:
        """Poll the SMTP port until the relay greets (bounded); fail with its log."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and relay.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.settimeout(TIMEOUT)
                    return s.recv(512)
            except OSError:
                time.sleep(0.1)
        if relay.poll() is None:
            relay.kill()
        _, err = relay.communicate(timeout=STOP_TIMEOUT)
        self.fail(f"the installed relay did not start:\n{tail(err)}")
