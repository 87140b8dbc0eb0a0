"""Print the project's dependencies from pyproject.toml, one per line.

The Makefile installs these into a virtualenv and runs the code from
C{src/} directly, so C{pyproject.toml} stays the only list of dependencies.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def main(argv: list[str]) -> int:
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    wanted = list(project["project"]["dependencies"])
    if "--dev" in argv:
        wanted += project["project"]["optional-dependencies"]["dev"]
    print("\n".join(wanted))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
