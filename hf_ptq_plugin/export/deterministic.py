"""Byte-identical checkpoints: the same model saved twice gives files with the same sha256.

The safetensors writer keeps `__metadata__` in a hash map, so its keys come out of each process in
a different order and every save of the same tensors hashes differently (content-addressed storage
and reproducibility checks then see a new file). `sort_metadata` rewrites the header in place with
those keys sorted; the header keeps its length (the writer pads it with spaces to 8 bytes, and the
same keys and values sorted serialize to the same number of bytes), so no tensor moves.
"""

import json
import struct
from pathlib import Path

HEADER_SIZE = struct.Struct("<Q")  # the header's byte length, before it


def sort_metadata(path) -> None:
    """Rewrite the safetensors file at `path` with its `__metadata__` keys in sorted order."""
    with open(path, "r+b") as handle:
        (length,) = HEADER_SIZE.unpack(handle.read(HEADER_SIZE.size))
        header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None)
        if not metadata:
            return
        header = {"__metadata__": dict(sorted(metadata.items())), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # never the case for a reordering; a header that would grow is left alone
            return
        handle.seek(HEADER_SIZE.size)
        handle.write(text.ljust(length, b" "))


def sort_all_metadata(directory: Path) -> None:
    """`sort_metadata` for every safetensors file directly in `directory`."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        sort_metadata(path)
