"""Files that are whole or absent: what a process killed, or a board losing power, at
any instant leaves behind is the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """`data` at `path` whole or not at all, durable once this returns: written to a
    `.partial` beside it, synced, renamed into place, and the folder synced."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
    sync_directory(path.parent)


def sync_directory(folder: Path) -> None:
    """Make a rename or a new file in `folder` survive a power loss: the file's own
    fsync does not persist its directory entry."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
