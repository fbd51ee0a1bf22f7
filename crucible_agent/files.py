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
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from schemas.region import Region

MANIFEST = "region.json"


class RegionFiles:
    def __init__(self, root: Path) -> None:
        self._root = root

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
