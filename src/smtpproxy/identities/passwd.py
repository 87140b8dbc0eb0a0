"""C{smtpproxy passwd}: print a bcrypt hash for a C{userpass} entry of C{AUTH_CONFIG}.

The password is read from a prompt (twice, without echo) or, with
C{--stdin}, from the first line of standard input: never from the command
line, where it would sit in the shell history and in C{ps} for anyone on
the host to read.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from smtpproxy.identities.userpass import MAX_PASSWORD_BYTES, hash_password


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the C{passwd} subcommand."""
    parser = commands.add_parser(
        "passwd",
        help="print a bcrypt hash of a password for AUTH_CONFIG's userpass users",
        description="Read a password (prompt, or --stdin) and print its bcrypt hash.",
    )
    parser.add_argument("--stdin", action="store_true", help="read the password from stdin")
    parser.add_argument(
        "--rounds",
        type=int,
        default=12,
        choices=range(10, 16),
        metavar="10-15",
        help="bcrypt cost (default 12: 0.25 to 0.8 s of CPU per uncached login)",
    )
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> int:
    if arguments.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            sys.stderr.write("smtpproxy passwd: the passwords differ\n")
            return 1
    if not password:
        sys.stderr.write("smtpproxy passwd: empty password\n")
        return 1
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        sys.stderr.write(f"smtpproxy passwd: longer than {MAX_PASSWORD_BYTES} bytes\n")
        return 1
    sys.stdout.write(hash_password(password, arguments.rounds) + "\n")
    return 0
