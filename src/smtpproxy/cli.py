"""The C{smtpproxy} command: facts about the relay that need no running service.

C{smtpproxy settings} prints every setting on one line of its own (name,
environment variable's YAML path, default, what it does), read from
L{smtpproxy.config.settings} (the relay's own and every provider's) and the
L{Config} defaults, the one declaration
the parser also reads.  twistd reflows an Options C{longdesc} into one
paragraph, so the table cannot live in C{twistd smtpproxy --help}; that
help points here, and C{twistd smtpproxy --help-settings} prints the same
table where only twistd is at hand (the container's entry point).

C{smtpproxy queue ...} looks at and acts on the durable queue
(L{smtpproxy.queue.command}).

C{--markdown} prints the rows as a Markdown table in the shape of the
operator guide's; the guide's own table adds longer explanations.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from smtpproxy import __version__
from smtpproxy.config import Config, settings
from smtpproxy.identities import passwd
from smtpproxy.policy.rules import AddressPatterns
from smtpproxy.queue import command as queue_command
from smtpproxy.tools import doctor, probe, send

HEADINGS = ("Variable", "YAML path", "Default", "Meaning")


def _shown(value: object) -> str:
    """A Config default as an operator would write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value is None:
        return "depends (see the guide)"
    if isinstance(value, AddressPatterns):
        return "empty (any)" if value.empty else "listed"
    if isinstance(value, tuple):
        return ", ".join(str(item) for item in value) if value else "empty"
    return str(value) if value != "" else "empty"


def rows() -> list[tuple[str, str, str, str]]:
    """(variable, YAML path, default, help) for every setting, in declaration order."""
    defaults = Config()
    return [
        (s.env, ".".join(s.yaml_path), _shown(getattr(defaults, s.attr)), s.help)
        for s in settings()
    ]


def settings_text() -> str:
    """The settings as aligned columns, one setting per line."""
    table = [HEADINGS, *rows()]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + "  "
        + row[3]
        for row in table
    ]
    return "\n".join(lines) + "\n"


def settings_markdown() -> str:
    """The settings as a Markdown table, one row per setting."""

    def cell(text: str, code: bool) -> str:
        text = text.replace("|", "\\|")
        return f"`{text}`" if code else text

    lines = ["| " + " | ".join(HEADINGS) + " |", "| --- | --- | --- | --- |"]
    for env, path, default, help_text in rows():
        shown_default = cell(default, not default.startswith(("empty", "depends")))
        fields = (cell(env, True), cell(path, True), shown_default, cell(help_text, False))
        lines.append("| " + " | ".join(fields) + " |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtpproxy",
        description="smtpproxy's tools; the relay itself runs as `twistd smtpproxy`.",
    )
    parser.add_argument("--version", action="version", version=f"smtpproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    settings = commands.add_parser(
        "settings",
        help="list every setting: variable, YAML path, default, meaning",
        description="List every setting, one per line.",
    )
    settings.add_argument(
        "--markdown", action="store_true", help="print a Markdown table (for the docs)"
    )
    probe.register(commands)
    send.register(commands)
    doctor.register(commands)
    queue_command.add_parser(commands)
    passwd.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the C{smtpproxy} console script."""
    arguments = _parser().parse_args(argv)
    if arguments.command == "settings":
        sys.stdout.write(settings_markdown() if arguments.markdown else settings_text())
        return 0
    # Each tool's register() set its entry point (smtpproxy.tools).
    status: int = arguments.run(arguments)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
