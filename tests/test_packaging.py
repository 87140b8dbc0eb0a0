"""Every package under src/ is listed in pyproject.toml, so the wheel ships it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


class PackageListTests(SynchronousTestCase):
    def test_every_package_is_listed(self) -> None:
        """A folder with an __init__.py under src/smtpproxy that pyproject.toml does not
        list would be missing from the installed relay (the source tree would still work,
        hiding it); the list and the tree must agree."""
        listed = set(
            tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
        )
        src = ROOT / "src"
        found = {
            ".".join(init.parent.relative_to(src).parts)
            for init in (src / "smtpproxy").rglob("__init__.py")
        }
        self.assertEqual(found - listed, set())
        self.assertEqual(listed - found - {"twisted.plugins"}, set())
