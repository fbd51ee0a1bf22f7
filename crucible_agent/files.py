"""Regions as real files: ``regions/<id>/`` with one file per extent and a region.json.

:class:`NoFiles` is the benchmark's ``trivial`` backend (``CRUCIBLE_BACKEND=trivial``):
the same calls, no files, so that a benchmark can measure the control plane (the
agent's protocol, records and outbox, Nexus's engine) without the cost of the
extent files' system calls.

Extent files are sparse (``truncate`` to ``extent_size * block_size``): the sizes are
real, the disk usage is not, which lets a laptop hold a rack's worth of regions.
``region.json`` is written last and atomically, so its presence means every extent
file is complete. Every step is idempotent, so work cut short by a crash is simply
done again from the start.

A snapshot is a copy of the region's files at that moment in
``regions/<id>/.zfs/snapshot/<name>/`` (where ZFS shows a dataset's snapshots), with a
``snapshot.json``; the copy keeps the extents' holes, so it costs what their data does.
It is built beside its final place and renamed into it, so a snapshot directory is
always complete. A running snapshot's read-only downstairs is a service description in
``downstairs/snapshot-<region>-<name>.json`` (the real agent's SMF instance of that
name): there while it runs, gone once it is stopped.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path

from schemas.region import Region
from schemas.snapshot import RunningSnapshot, Snapshot

MANIFEST = "region.json"
_COPY_CHUNK = 1 << 20


SNAPSHOT_MANIFEST = "snapshot.json"


class RegionFiles:
    def __init__(self, root: Path, services: Path | None = None) -> None:
        self._root = root
        self._services = services if services is not None else root.parent / "downstairs"

    def directory(self, region_id: uuid.UUID) -> Path:
        return self._root / str(region_id)

    def prepare(self, region: Region) -> None:
        directory = self.directory(region.id)
        directory.mkdir(parents=True, exist_ok=True)
        # A crash may have left a manifest from an earlier attempt; the extents are
        # about to be rewritten, so it must not claim they are complete.
        (directory / MANIFEST).unlink(missing_ok=True)

    def write_extent(self, region: Region, index: int) -> None:
        path = self.directory(region.id) / f"{index:05d}.extent"
        with path.open("ab") as extent:
            extent.truncate(region.extent_size * region.block_size)

    def seal(self, region: Region) -> None:
        """Record the region's parameters beside its extents, atomically."""
        directory = self.directory(region.id)
        manifest = {
            key: value
            for key, value in region.model_dump(mode="json").items()
            if key not in {"state", "generation", "failure"}
        }
        partial = directory / f"{MANIFEST}.partial"
        with partial.open("w") as out:
            json.dump(manifest, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(directory / MANIFEST)

    def remove(self, region_id: uuid.UUID) -> None:
        """Removes the region's directory, if there is one; raises OSError when it cannot
        (a destroy that fails is recorded as such, not ignored)."""
        directory = self.directory(region_id)
        if directory.exists():
            shutil.rmtree(directory)

    def extent_paths(self, region_id: uuid.UUID) -> list[Path]:
        return sorted(self.directory(region_id).glob("*.extent"))

    # Snapshots.

    def snapshot_directory(self, region_id: uuid.UUID, name: str) -> Path:
        return self.directory(region_id) / ".zfs" / "snapshot" / name

    def take_snapshot(self, snapshot: Snapshot) -> None:
        """Copies the region's extents and manifest as they are now into the snapshot's
        directory, replacing whatever an earlier attempt left there."""
        source = self.directory(snapshot.region_id)
        target = self.snapshot_directory(snapshot.region_id, snapshot.name)
        partial = target.with_name(f".{snapshot.name}.partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        for path in [*self.extent_paths(snapshot.region_id), source / MANIFEST]:
            _copy_sparse(path, partial / path.name)
        _write_json(partial / SNAPSHOT_MANIFEST, snapshot.model_dump(mode="json"))
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)

    def remove_snapshot(self, region_id: uuid.UUID, name: str) -> None:
        target = self.snapshot_directory(region_id, name)
        if target.exists():
            shutil.rmtree(target)

    def snapshot_names(self, region_id: uuid.UUID) -> list[str]:
        """The snapshots whose directories are complete."""
        root = self.directory(region_id) / ".zfs" / "snapshot"
        if not root.exists():
            return []
        return sorted(path.name for path in root.iterdir() if not path.name.startswith("."))

    # Running snapshots' downstairs.

    def service(self, running: RunningSnapshot) -> Path:
        return self._services / f"snapshot-{running.id}-{running.name}.json"

    def start_downstairs(self, running: RunningSnapshot) -> None:
        """Describes the read-only downstairs that serves the snapshot on its port."""
        directory = self.snapshot_directory(running.id, running.name)
        if not (directory / SNAPSHOT_MANIFEST).exists():
            raise FileNotFoundError(f"snapshot directory {directory} is missing")
        self._services.mkdir(parents=True, exist_ok=True)
        _write_json(
            self.service(running),
            {"directory": str(directory), "port": running.port_number, "mode": "ro"},
        )

    def stop_downstairs(self, running: RunningSnapshot) -> None:
        self.service(running).unlink(missing_ok=True)


def _write_json(path: Path, content: dict[str, object]) -> None:
    partial = path.with_name(f"{path.name}.partial")
    with partial.open("w") as out:
        json.dump(content, out, indent=2)
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)


def _copy_sparse(source: Path, target: Path) -> None:
    """Copies ``source`` to ``target`` byte for byte, leaving its holes holes: only the
    ranges that hold data are read and written (SEEK_DATA / SEEK_HOLE)."""
    with source.open("rb") as reading, target.open("wb") as writing:
        size = os.fstat(reading.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(reading.fileno(), offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:
                    break  # nothing but a hole from here to the end
                raise
            end = os.lseek(reading.fileno(), start, os.SEEK_HOLE)
            reading.seek(start)
            writing.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = reading.read(min(remaining, _COPY_CHUNK))
                if not chunk:
                    break
                writing.write(chunk)
                remaining -= len(chunk)
            offset = end
        writing.truncate(size)
        writing.flush()
        os.fsync(writing.fileno())


class NoFiles(RegionFiles):
    """The ``trivial`` backend: every step succeeds at once and nothing is written.

    For the benchmark's ``peers`` phase only (engine against engine, agents as cheap as
    they can be while they keep their protocol): the agent still records every state
    change in its database and publishes it through its outbox; a region it reports
    ``created`` has no files, so nothing may use it as storage.
    """

    def prepare(self, region: Region) -> None:
        pass

    def write_extent(self, region: Region, index: int) -> None:
        pass

    def seal(self, region: Region) -> None:
        pass

    def remove(self, region_id: uuid.UUID) -> None:
        pass

    def extent_paths(self, region_id: uuid.UUID) -> list[Path]:
        return []
