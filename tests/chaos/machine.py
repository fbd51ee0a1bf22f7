"""Small filesystems under the crucible agents' data directories, which the chaos test
fills and empties: a tmpfs the test mounts, which needs root (or CAP_SYS_ADMIN); without
it the test fails with a clear message rather than being skipped.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

FILL_CHUNK = 1 << 20
FILL_TAIL_CHUNK = 4096


class MountFailed(Exception):
    """The small filesystem could not be mounted (or unmounted); the message says why."""


class SmallDisk:
    """A tmpfs of ``size_bytes`` mounted on ``path``: an agent's data directory on a disk
    that the test can fill (one filler file, written until ENOSPC) and empty again."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self.mounted = False

    @property
    def filler(self) -> Path:
        return self.path / "chaos-filler"

    @property
    def full(self) -> bool:
        return self.filler.exists()

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _run_mount(
            "mount", "-t", "tmpfs", "-o", f"size={self.size_bytes},mode=0755", "tmpfs", self.path
        )
        self.mounted = True

    def fill(self) -> int:
        """Write the filler until the filesystem has no byte left; its size."""
        written = 0
        with self.filler.open("ab", buffering=0) as filler:
            for chunk in (FILL_CHUNK, FILL_TAIL_CHUNK):
                block = b"\0" * chunk
                while True:
                    try:
                        written += filler.write(block) or 0
                    except OSError as error:
                        if error.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def unmount(self, keep: Path | None = None) -> None:
        """Unmount (lazily if something still holds it); first copy the agent's state
        database to ``keep``, to look at after the run (the region files are sparse
        and not worth a copy)."""
        if not self.mounted:
            return
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for state in self.path.glob("agent.sqlite*"):
                shutil.copyfile(state, keep / state.name)
        try:
            _run_mount("umount", self.path)
        except MountFailed:
            _run_mount("umount", "-l", self.path)
        self.mounted = False


def _run_mount(*argv: str | Path) -> None:
    command = [str(arg) for arg in argv]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise MountFailed(f"{' '.join(command)}: {error}") from error
    if result.returncode != 0:
        raise MountFailed(
            f"{' '.join(command)} failed ({result.returncode}): "
            f"{(result.stdout + result.stderr).strip()} (the chaos test mounts a small "
            "tmpfs under a crucible agent's data directory and needs root, or "
            "CAP_SYS_ADMIN, to do so)"
        )
