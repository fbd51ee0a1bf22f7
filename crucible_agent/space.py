"""Out of space: telling it from other failures, and a reserve that keeps the agent's own
records writable when its data directory fills.

A full filesystem is not a transient failure for a new region: the create is answered,
failed with the reason (docs/design.md, "Agents"). Answering needs a write of its own
(the region's ``failed`` record and its event, through the outbox), and so do a delete
(which frees space), the relay marking messages sent, and announcements. So the agent
keeps a file of ``size`` really allocated bytes in its data directory. When a write
fails for want of space, the store releases it and the write is tried once more in the
room it leaves; while it is released, new regions fail at once without writing files
(their files would eat the room the records need). It is taken again once twice its
size is free, and new regions are then created again. A ballast file of this kind is
how CockroachDB keeps a full node operable.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_CHUNK = 1 << 20


def is_out_of_space(error: BaseException) -> bool:
    """A filesystem that is full (or a quota reached), or SQLite's "database or disk is
    full" (SQLITE_FULL), also when SQLAlchemy wraps it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in OUT_OF_SPACE_ERRNOS:
            return True
        if isinstance(current, sqlite3.Error):
            code = getattr(current, "sqlite_errorcode", None)
            if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
                return True
        wrapped = getattr(current, "orig", None)
        current = wrapped if isinstance(wrapped, BaseException) else current.__cause__
    return False


class SpaceReserve:
    """``size`` bytes held in ``path`` while there is room; ``size`` 0 keeps none."""

    def __init__(self, path: Path, size: int) -> None:
        if size < 0:
            raise ValueError(f"a space reserve of {size} bytes")
        self.path = path
        self.size = size
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path.parent)
        return stats.f_bavail * stats.f_frsize

    def shortage(self) -> str | None:
        """Why a new region cannot be created now, or None. Takes the reserve first if it
        is not held and there is room for it (space came back)."""
        if self.size == 0 or self.hold():
            return None
        return (
            f"the data directory's filesystem is full ({self.free_bytes()} bytes free; new "
            f"regions need {2 * self.size}, half of it kept for the agent's own records)"
        )

    def hold(self) -> bool:
        """Take the reserve if it is not held and twice its size is free; whether it is
        held now (always, for a reserve of 0 bytes)."""
        if self.size == 0:
            return True
        if self._held:
            return True
        try:
            if self.path.exists() and self.path.stat().st_blocks * 512 >= self.size:
                self._held = True
                return True
            if self.free_bytes() < 2 * self.size:
                return False
            self._allocate()
        except OSError as error:
            if not is_out_of_space(error):
                raise
            self.path.unlink(missing_ok=True)
            return False
        self._held = True
        log.info("space reserve of %d bytes held in %s", self.size, self.path)
        return True

    def release(self) -> bool:
        """Give the reserve's space back to the filesystem; whether there was one to give."""
        if self.size == 0 or not self.path.exists():
            self._held = False
            return False
        self.path.unlink()
        self._held = False
        log.warning("data directory full: released the space reserve of %d bytes", self.size)
        return True

    def _allocate(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("wb") as reserve:
            try:
                os.posix_fallocate(reserve.fileno(), 0, self.size)
            except OSError as error:
                if error.errno not in {errno.EOPNOTSUPP, errno.EINVAL}:
                    raise
                # A filesystem without fallocate: written zeros are allocated too.
                for start in range(0, self.size, _CHUNK):
                    reserve.write(bytes(min(_CHUNK, self.size - start)))
            reserve.flush()
            os.fsync(reserve.fileno())
