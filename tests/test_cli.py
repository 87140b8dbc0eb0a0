"""The `smtpproxy` command and `twistd smtpproxy --help-settings`: the settings table.

twistd reflows an Options longdesc into one paragraph, so the table of
settings is printed by these instead; both read config.settings().
"""

from __future__ import annotations

import contextlib
import io
import re

from twisted.trial.unittest import SynchronousTestCase

from smtpproxy import cli, tap
from smtpproxy.config import Config, settings


def run(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(argv))
    assert code == 0
    return out.getvalue()


class SettingsCommandTests(SynchronousTestCase):
    def test_one_line_per_setting(self) -> None:
        """`smtpproxy settings`: a heading, then each setting exactly once, alone on its
        line, with its YAML path and help text."""
        lines = run("settings").splitlines()
        self.assertEqual(lines[0].split()[:2], ["Variable", "YAML"])
        self.assertEqual([line.split()[0] for line in lines[1:]], [s.env for s in settings()])
        for setting, line in zip(settings(), lines[1:], strict=True):
            self.assertEqual(line.split()[1], ".".join(setting.yaml_path))
            self.assertTrue(line.endswith(setting.help), line)

    def test_markdown_rows_carry_the_code_defaults(self) -> None:
        """`--markdown`: one table row per setting; every default written as a value
        reads back, through the setting's own parser, as the Config default."""
        rows = [line for line in run("settings", "--markdown").splitlines() if line]
        heading = ["| Variable | YAML path | Default | Meaning |", "| --- " * 4 + "|"]
        self.assertEqual(rows[:2], heading)
        defaults = Config()
        self.assertEqual(len(rows), len(settings()) + 2)
        for setting, row in zip(settings(), rows[2:], strict=True):
            match = re.match(r"^\| `([A-Z0-9_]+)` \| `([a-z0-9_.]+)` \| ([^|]*) \|", row)
            assert match is not None, row
            name, path, written = match.groups()
            self.assertEqual((name, path), (setting.env, ".".join(setting.yaml_path)))
            value = re.match(r"^`([^`]*)`", written)
            if value is None:
                continue  # "empty", "depends (see the guide)"
            parsed = setting.parse(value.group(1))
            self.assertEqual(parsed, getattr(defaults, setting.attr), row)

    def test_a_command_is_required(self) -> None:
        """Without a command the tool says what it takes and exits with status 2."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as caught:
            cli.main([])
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("settings", err.getvalue())


class TwistdOptionsTests(SynchronousTestCase):
    def test_help_settings_prints_the_same_table(self) -> None:
        """`twistd smtpproxy --help-settings` prints what `smtpproxy settings` prints
        and exits 0 before any setting is checked."""
        out = io.StringIO()
        options = tap.Options(environ={"SMTP_MAX_MESSAGE_SIZE": "lots"})
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--help-settings"])
        self.assertEqual(caught.exception.code, 0)
        self.assertEqual(out.getvalue(), run("settings"))

    def test_longdesc_is_short_and_points_to_the_table(self) -> None:
        """The longdesc twistd reflows names no setting; it says where the list is."""
        longdesc = tap.Options(environ={}).longdesc
        self.assertIn("--help-settings", longdesc)
        self.assertIn("smtpproxy settings", longdesc)
        self.assertNotIn("SMTP_MAX_MESSAGE_SIZE", longdesc)
