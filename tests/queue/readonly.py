"""Files that really refuse writes, for the queue's readiness tests, whoever runs them.

C{chmod} does not stop root, and the CI runs as root; remounting the
filesystem read-only is refused while the queue has files open for
writing.  As root, the immutable flag (C{chattr +i}) refuses every write,
even through a descriptor opened before it was set, and the kernel's
C{access()} reports it; without root, taking the write bits away does the
same.  A filesystem that has no immutable flag (overlayfs, tmpfs) makes
the test skip, saying so.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence

from twisted.trial.unittest import SkipTest


def make_unwritable(paths: Sequence[str]) -> Callable[[], None]:
    """Make C{paths} refuse writes now; the function returned undoes it (call it once).

    @raise SkipTest: as root, when C{chattr} is missing or the filesystem
        has no immutable flag.
    """
    if os.geteuid() != 0:
        modes = {path: stat.S_IMODE(os.stat(path).st_mode) for path in paths}
        for path in paths:
            os.chmod(path, 0o444)

        def give_back() -> None:
            for path, mode in modes.items():
                os.chmod(path, mode)

        return give_back
    chattr = shutil.which("chattr")
    if chattr is None:
        raise SkipTest("as root only the immutable flag stops writes, and chattr is not installed")
    done = subprocess.run(
        [chattr, "+i", *paths], capture_output=True, timeout=30, check=False, text=True
    )
    if done.returncode != 0:
        subprocess.run([chattr, "-i", *paths], capture_output=True, timeout=30, check=False)
        raise SkipTest(f"this filesystem has no immutable flag: {done.stderr.strip()}")

    def thaw() -> None:
        subprocess.run([chattr, "-i", *paths], capture_output=True, timeout=30, check=True)

    return thaw
