"""What calibration data a model saw, as a small JSON-friendly record for the model card.

`calibration_record(forward_loop)` summarizes a forward loop: for the loops that
`calibration_forward_loop` builds, the data source and the exact sample and token counts; for
any other callable only that a custom loop ran (nothing is guessed). `quantize()` and
`calibrate()` store the result on the model as `model.calibration_record`, for the model card.
"""

from pathlib import Path
from typing import Callable, Optional


def describe_source(data) -> str:
    """A short, shareable description of calibration data (a local path is reduced to its name)."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.exists():
            return f"{path.name} (local {'folder' if path.is_dir() else 'file'})"
        return str(data)  # a hub dataset name
    if isinstance(data, (list, tuple)):
        return f"a list of {len(data)} texts"
    if hasattr(data, "column_names"):
        return f"a datasets.Dataset of {len(data)} rows"
    if hasattr(data, "shape"):
        return f"token ids of shape {tuple(data.shape)}"
    return type(data).__name__


def calibration_record(forward_loop: Optional[Callable]) -> Optional[dict]:
    """{"source", "samples", "max_seq_len", "tokens"} for `forward_loop`; None when no data was used."""
    if forward_loop is None:
        return None
    batches = getattr(forward_loop, "batches", None)
    if batches is None:
        return {"source": "a custom forward_loop", "samples": None, "max_seq_len": None, "tokens": None}
    return {"source": getattr(forward_loop, "source", "") or "token batches",
            "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
            "max_seq_len": max((int(b["input_ids"].shape[1]) for b in batches), default=0),
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches)}
