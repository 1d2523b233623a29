"""Atomic directory writes: build a checkpoint in a temporary sibling directory, then swap it in.

An exception while writing leaves the destination exactly as it was (the temporary directory is
removed). On success, files already in the destination that the new save does not write (a
tokenizer saved there earlier, a README) are carried over, except stale weight files; then the
old directory is renamed aside, the new one renamed into place, and the old one deleted. Tensors
memory-mapped from the old files stay readable (Linux keeps unlinked mapped files alive), so a
model loaded from a directory can be saved back into it. The new safetensors files get their
metadata keys sorted (`deterministic.py`), whichever writer made them.
"""

import contextlib
import fnmatch
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .deterministic import sort_all_metadata

logger = logging.getLogger(__name__)

# Weight files of an older save: carrying them over would mix two checkpoints.
STALE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "rank*.safetensors",
                  "pytorch_model.bin.index.json", "hf_quant_config.json")


@contextlib.contextmanager
def atomic_directory(destination) -> Iterator[Path]:
    """Yield an empty directory; when the block succeeds it becomes `destination`."""
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise ValueError(f"save directory {str(destination)!r} is an existing file, not a directory")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.saving-", dir=destination.parent))
    try:
        yield staging
        sort_all_metadata(staging)  # every writer's files byte-identical for the same model; before any carry-over
        if destination.exists():
            _carry_over(destination, staging)
        _swap_in(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _carry_over(old: Path, new: Path) -> None:
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or any(fnmatch.fnmatch(entry.name, p) for p in STALE_PATTERNS):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source, target) -> None:
    # A hard link costs nothing for large files; fall back to a copy across file systems.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _swap_in(staging: Path, destination: Path) -> None:
    if not destination.exists():
        os.rename(staging, destination)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
    os.rename(destination, retired / destination.name)
    try:
        os.rename(staging, destination)
    except OSError:
        os.rename(retired / destination.name, destination)  # put the old checkpoint back
        raise
    shutil.rmtree(retired, ignore_errors=True)
