"""Files that really cannot be read, although the tests run as root here.

Root reads a mode-000 file through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH. A child
process started with ``child_kwargs()`` has both dropped from its capability bounding set
before exec (prctl PR_CAPBSET_DROP), so after exec it holds neither: a mode-000 file (or
folder) is then unreadable for it, while it still writes whatever root owns with the
owner's write bit (the test's own folders, its workspace). Not root: plain chmod 000
already does it, and ``child_kwargs()`` adds nothing.

The first call checks all of that for real in a child (a mode-000 file refused, a file in
a root-owned folder written and read back) and skips the test, with the reason, when the
capabilities cannot be dropped (no CAP_SETPCAP, not Linux) or it did not work.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2

_checked: str | None = None  # "" when it works, else why not


def drop_read_override() -> None:
    """preexec_fn: drop the capabilities that let root read any file (from the bounding
    set, so that exec gives them back no more)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(errno)}")


PROBE = """
import sys
from pathlib import Path
locked, folder = Path(sys.argv[1]), Path(sys.argv[2])
try:
    locked.read_bytes()
    print("read the mode-000 file")
    sys.exit(1)
except PermissionError:
    pass
(folder / "written").write_text("ok")
assert (folder / "written").read_text() == "ok"
print("ok")
"""


def _check() -> str:
    if os.geteuid() != 0:
        return ""
    with tempfile.TemporaryDirectory() as folder:
        locked = Path(folder) / "locked"
        locked.write_text("secret")
        locked.chmod(0)
        try:
            result = subprocess.run([sys.executable, "-c", PROBE, str(locked), folder], check=False, capture_output=True,
                                    text=True, timeout=60, preexec_fn=drop_read_override)
        except subprocess.SubprocessError as error:  # the preexec_fn raised: prctl refused
            return f"cannot drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (prctl PR_CAPBSET_DROP: {error}; no CAP_SETPCAP?)"
        if result.returncode != 0 or result.stdout.strip() != "ok":
            return f"a child without CAP_DAC_OVERRIDE did not behave as expected: {result.stdout} {result.stderr}"[:500]
    return ""


def child_kwargs() -> dict[str, Any]:
    """subprocess keyword arguments for a child that cannot read mode-000 files (skips the
    test, saying why, where that cannot be arranged)."""
    global _checked
    if _checked is None:
        _checked = _check()
    if _checked:
        pytest.skip(_checked)
    return {"preexec_fn": drop_read_override} if os.geteuid() == 0 else {}


def make_unreadable(path: Path) -> Path:
    path.chmod(0)
    return path
