"""Atomic directory writes: build a checkpoint in a temporary sibling directory, then swap it in.

The destination is resolved first (".", "x/..", symlinks, its own link included: a save through a link to a
checkpoint replaces the directory it points to and the link stays a link). The checkpoint is built in
`.NAME.saving-XXXXXXXX` beside it. An exception while writing leaves the destination exactly as it was (that
directory is removed). On success, files already in the destination that the new save does not write are carried
over (a tokenizer saved there earlier, the user's notes; symlinks stay symlinks), except files that describe a
model (`STALE_PATTERNS`): a checkpoint keeps no weights, configs or card of an earlier one. The new directory gets
the mode of the one it replaces, or 0777 minus the umask (as `os.makedirs` gives). Then a marker
(`COMPLETE_MARKER`) says the staging directory is complete, the old directory is renamed into
`.NAME.old-XXXXXXXX/NAME`, the marker removed, the new directory renamed into place, and the old one deleted.
Tensors memory-mapped from the old files stay readable (Linux keeps unlinked mapped files alive), so a model
loaded from a directory can be saved back into it, also the current working directory (the process is moved back
into the new directory, since its working directory follows the renamed old one).

A save killed midway leaves those sibling directories behind. Each is held by an exclusive `flock` for as long as
its save runs; the kernel releases it when the process dies, however it dies, so a directory whose lock can be
taken belongs to no live save (unlike a pid file: no pid reuse, and it holds across pid namespaces sharing the
file system). `recover_interrupted_save` (run before every save) deletes such leftovers, and if the destination
is missing because a save was killed between its two renames, renames the complete copy back: the new one if its
marker says it is complete, else the old one. On a file system without `flock` on directories (NFS) nothing can
be shown to be unused, so leftovers are left alone there. The new safetensors files get their metadata keys
sorted (`deterministic.py`), whichever writer made them.
"""

import contextlib
import fnmatch
import logging
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Iterator, List, Optional

from .deterministic import sort_all_metadata

try:
    import fcntl
except ImportError:  # no flock (Windows): no leftover can be shown to be unused
    fcntl = None

logger = logging.getLogger(__name__)

# Files that describe one model (weights, configs, model card): a save writes its own, and an earlier save's copy
# must not survive into a checkpoint that did not write it (a legacy TensorRT-LLM export over a unified checkpoint
# would keep its generation_config.json). Other files (tokenizer, the user's) are carried over.
STALE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "rank*.safetensors",
                  "pytorch_model.bin.index.json", "hf_quant_config.json", "config.json", "generation_config.json",
                  "quant_cfg.json", "README.md",
                  "encoder", "decoder")  # the directories of an encoder-decoder legacy TensorRT-LLM checkpoint

# Written into a staging directory once everything else is in it, removed just before it is renamed into place.
COMPLETE_MARKER = ".save-complete"

STAGING, RETIRED = "saving", "old"
DISCARDED = ".discarded"  # a retired copy's name while it is deleted, so that half of it is never restored


@contextlib.contextmanager
def atomic_directory(destination) -> Iterator[Path]:
    """Yield an empty directory; when the block succeeds it becomes `destination`."""
    destination = resolve_destination(destination)
    recover_interrupted_save(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with _locked_sibling(destination, STAGING, mode=0o777) as staging:  # the umask applies, as for os.makedirs
        try:
            yield staging
            sort_all_metadata(staging)  # every writer's files byte-identical for the same model; before any carry-over
            if destination.exists():
                _carry_over(destination, staging)
                os.chmod(staging, stat.S_IMODE(destination.stat().st_mode))
            (staging / COMPLETE_MARKER).touch()
            _swap_in(staging, destination)
        except BaseException:
            _discard(staging, destination.name)
            raise


def resolve_destination(destination) -> Path:
    """The real directory a save into `destination` replaces, so that its siblings are the real directory's."""
    resolved = Path(destination).resolve()
    if not resolved.name:
        raise ValueError(f"cannot save into the file system root {str(destination)!r}")
    if resolved.exists() and not resolved.is_dir():
        raise ValueError(f"save directory {str(destination)!r} is an existing file, not a directory")
    return resolved


def recover_interrupted_save(directory) -> Optional[str]:
    """Clean up after saves into `directory` that were killed; return what was restored, or None.

    If `directory` is missing and a save was killed between its two renames, the complete copy it left is
    renamed back into place (the new checkpoint if its marker says it is complete, else the old one), with a
    warning; the message is returned. Leftover staging directories and old copies that no live save holds are
    deleted (best effort). Directories a running save holds are never touched, so this is safe to call before a
    load; an OSError of the restoring rename (e.g. a read-only parent directory) is raised.
    """
    destination = Path(directory).resolve()
    if not destination.name:
        return None
    message = None
    with contextlib.ExitStack() as claims:
        unused = [path for path in _leftovers(destination) if claims.enter_context(_claim(path))]
        if unused and not destination.exists():
            message = _restore(unused, destination)
        leftovers = [path for path in unused if path.exists()]  # a restored staging directory moved away
        for path in leftovers:
            _discard(path, destination.name)
    if leftovers:
        logger.info("removed %d leftover(s) of interrupted saves into %s: %s", len(leftovers), destination,
                    ", ".join(path.name for path in leftovers))
    return message


def _leftovers(destination: Path) -> List[Path]:
    pattern = re.compile(re.escape(f".{destination.name}.") + rf"({STAGING}|{RETIRED})-[a-z0-9_]{{8}}")
    try:
        names = os.listdir(destination.parent)
    except OSError:  # no parent (nothing was ever saved there), or not readable
        return []
    return sorted(destination.parent / name for name in names if pattern.fullmatch(name))


def _restore(candidates: List[Path], destination: Path) -> Optional[str]:
    """Rename the newest complete copy among `candidates` into `destination`; a complete new one wins."""
    complete = [path for path in candidates if _kind(path) == STAGING and (path / COMPLETE_MARKER).exists()]
    source, what = _newest(complete), "the new checkpoint of a save killed before its last rename"
    if source is not None:
        (source / COMPLETE_MARKER).unlink()
    else:
        retired = [path for path in candidates if _kind(path) == RETIRED and (path / destination.name).is_dir()]
        source, what = _newest(retired), "the previous checkpoint, moved aside by a save killed before its last rename"
        if source is None:
            return None
        source = source / destination.name
    os.rename(source, destination)
    message = f"{destination} was missing; restored {what} (from {source})"
    logger.warning(message)
    return message


def _kind(path: Path) -> str:
    return STAGING if path.name.rsplit(".", 1)[-1].startswith(STAGING + "-") else RETIRED


def _newest(paths: List[Path]) -> Optional[Path]:
    # Several complete copies only if earlier leftovers were never cleaned; the latest save's is the one wanted.
    return max(paths, key=lambda path: path.stat().st_mtime, default=None)


def _discard(path: Path, name: str) -> None:
    """Delete a leftover so that a kill midway leaves nothing restorable: what marks it complete goes first."""
    with contextlib.suppress(OSError):
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        if _kind(path) == RETIRED and (path / name).is_dir():
            shutil.rmtree(path / DISCARDED, ignore_errors=True)  # what an earlier kill left half deleted
            os.rename(path / name, path / DISCARDED)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked_sibling(destination: Path, kind: str, mode: int) -> Iterator[Path]:
    """A new directory `.NAME.<kind>-XXXXXXXX` beside `destination`, locked by this process until the block ends."""
    while True:
        path = destination.parent / f".{destination.name}.{kind}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        _flock(descriptor, blocking=True)
        if _still_at(descriptor, path):
            break
        os.close(descriptor)  # another process's cleanup took it before the lock: make another
    try:
        yield path
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _claim(path: Path) -> Iterator[bool]:
    """True (with this process holding its lock for the block) if no live save holds directory `path`."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # deleted meanwhile, or not a directory
        descriptor = None
    if descriptor is None:
        yield False
        return
    try:
        yield _flock(descriptor, blocking=False) and _still_at(descriptor, path)
    finally:
        os.close(descriptor)


def _flock(descriptor: int, blocking: bool) -> bool:
    """Lock exclusively; False if another process holds the lock, or the file system cannot lock (a save then
    goes on unlocked, and a cleanup leaves the directory alone)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _still_at(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except OSError:
        return False


def _carry_over(old: Path, new: Path) -> None:
    for entry in old.iterdir():
        target = new / entry.name
        if os.path.lexists(target) or any(fnmatch.fnmatch(entry.name, p) for p in STALE_PATTERNS):
            continue
        if entry.is_symlink():  # a link to a shared tokenizer stays a link, not a copy of its target
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
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
        _rename_complete(staging, destination)
        return
    working_directory = _working_directory_within(destination)
    with _locked_sibling(destination, RETIRED, mode=0o700) as retired:
        os.rename(destination, retired / destination.name)
        try:
            _rename_complete(staging, destination)
        except BaseException:
            os.rename(retired / destination.name, destination)  # put the old checkpoint back
            raise
        if working_directory is not None:  # it followed the old directory; it should stay at its path
            os.chdir(working_directory if working_directory.is_dir() else destination)
        _discard(retired, destination.name)


def _rename_complete(staging: Path, destination: Path) -> None:
    # The marker goes first: a kill between the two leaves a staging directory that is not restored, and the
    # old checkpoint (still aside) is restored instead.
    (staging / COMPLETE_MARKER).unlink()
    os.rename(staging, destination)


def _working_directory_within(directory: Path) -> Optional[Path]:
    try:
        cwd = Path.cwd()
    except OSError:  # already deleted
        return None
    return cwd if cwd == directory or directory in cwd.parents else None
