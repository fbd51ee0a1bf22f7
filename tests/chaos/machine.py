"""What the chaos test does below the services: the rack's own PostgreSQL cluster, which
it stops (``pg_ctl stop -m immediate``) and SIGKILLs, and small filesystems under the
crucible agents' data directories, which it fills and empties.

Both need what a test harness rarely has, and fail with a clear message when it is
missing rather than being skipped: a PostgreSQL cluster of its own (never a shared
server, which a test must not stop), and permission to ``mount -t tmpfs``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.harness.servers import PrivatePostgresCluster

# Orphaned backends notice their postmaster's death within moments; and the machine's
# init reaps the dead postmaster within a few seconds (until it does, the postmaster
# still "exists", and a new one refuses its lock file).
POSTMASTER_GONE_TIMEOUT = 30.0
FILL_CHUNK = 1 << 20
FILL_TAIL_CHUNK = 4096


class ChaosPostgres(PrivatePostgresCluster):
    """A private cluster that only the chaos test uses, so that it may stop and kill it.

    Same port and data directory across restarts, as a server restarted for an upgrade
    or after a crash would be.
    """

    mode = "private cluster of the chaos test"

    @property
    def log_path(self) -> Path:
        return self._dir / "log"

    def postmaster_pid(self) -> int | None:
        try:
            return int((self._data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop_immediate(self) -> None:
        """``pg_ctl stop -m immediate``: every backend quits at once, no checkpoint; the
        next start recovers from the WAL."""
        self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "-w", "stop")

    def kill(self) -> str:
        """SIGKILL the postmaster; returns what happened to its children.

        Its backends find their postmaster gone and exit by themselves; any still there
        after the wait are killed too, since a new postmaster cannot start while they
        hold the old shared memory.
        """
        pid = self.postmaster_pid()
        if pid is None or not _alive(pid):
            raise RuntimeError(f"no postmaster to kill (pid file says {pid})")
        children = _children_of(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + POSTMASTER_GONE_TIMEOUT
        while (_exists(pid) or any(_alive(child) for child in children)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        stragglers = [child for child in children if _alive(child)]
        for child in stragglers:
            _signal(child, signal.SIGKILL)
        if _exists(pid):
            raise RuntimeError(
                f"the killed postmaster {pid} was not reaped within "
                f"{POSTMASTER_GONE_TIMEOUT:g}s; PostgreSQL cannot start again until it is"
            )
        return f"postmaster {pid} and {len(children)} children" + (
            f" ({len(stragglers)} killed after it)" if stragglers else ""
        )

    @property
    def running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and _alive(pid)

    def save_log(self, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists():
            shutil.copyfile(self.log_path, destination)


def _exists(pid: int) -> bool:
    """The process exists, if only as a zombie not yet reaped."""
    return Path(f"/proc/{pid}").exists()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


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
