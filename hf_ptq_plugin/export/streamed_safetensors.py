"""Safetensors files written one tensor at a time, so a converted checkpoint never exists whole in memory.

safetensors' own writer takes every tensor of a file at once. A compressed-tensors export converts
each quantized layer (INT4 codes repacked into int32 words, scales reshaped); holding every layer's
conversion at once would double the quantized model's memory, which is what decides whether a large
model can be exported on a small machine. Here a file's header is built from the shapes and dtypes
of its tensors (known before any is converted: `specs`, meta tensors do), then each tensor is
produced, written and dropped.

The file is what safetensors reads (and `safe_open` checks): the header's byte length (8 bytes,
little-endian), the JSON header padded with spaces to a multiple of 8, then the tensors' bytes back
to back in header order, with no gap. Names are written sorted and `__metadata__` keys sorted, so
the same tensors always give the same bytes.
"""

import json
import struct
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ALIGNMENT = 8  # the header is padded so that the tensors' bytes start 8-byte aligned


def tensor_bytes(spec: torch.Tensor) -> int:
    return spec.numel() * spec.element_size()


def write_streamed(path: Path, specs: Dict[str, torch.Tensor], produce: Callable[[str], torch.Tensor],
                   metadata: Optional[Dict[str, str]] = None) -> None:
    """Write the tensors named in `specs` (any device, meta included: only shape and dtype are read)
    to `path`, each obtained from `produce(name)` just before it is written."""
    names = sorted(specs)
    header = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in names:
        spec = specs[name]
        if spec.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {spec.dtype}, which safetensors cannot store; "
                             f"storable: {sorted(str(d) for d in DTYPE_NAMES)}")
        size = tensor_bytes(spec)
        header[name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % ALIGNMENT)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for name in names:
            tensor = produce(name)
            if tensor.dtype != specs[name].dtype or tensor.shape != specs[name].shape:
                raise RuntimeError(f"tensor {name!r} came out {tensor.dtype} {tuple(tensor.shape)}, not the "
                                   f"{specs[name].dtype} {tuple(specs[name].shape)} its header says")
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
