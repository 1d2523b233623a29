"""Text into token windows: evaluation windows and calibration samples, from any text.

Accepts the Austen novels or the user's own text files (a .txt file or a folder of them).
Selection is deterministic: evaluation takes the first windows of the text; calibration takes
windows spread evenly over the whole text, so every part of a multi-book corpus contributes.
"""

from pathlib import Path
from typing import Union

import torch


def read_text(path: Union[str, Path]) -> str:
    """The text of a .txt file, or of every .txt file in a folder (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"no .txt files in folder {str(path)!r}")
        return "\n\n".join(utf8_text(f) for f in files)
    if not path.is_file():
        raise ValueError(f"text path {str(path)!r} does not exist (expected a .txt file or a folder of them)")
    return utf8_text(path)


def utf8_text(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is a ValueError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason})") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of `text` as a 1-D LongTensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def first_windows(ids: torch.Tensor, seq_len: int, num_windows: int) -> torch.Tensor:
    """The first `num_windows` consecutive non-overlapping windows: (num_windows, seq_len)."""
    available = ids.numel() // seq_len
    if available < num_windows:
        raise ValueError(f"text has {ids.numel()} tokens: {available} windows of {seq_len}, {num_windows} requested")
    return ids[: num_windows * seq_len].view(num_windows, seq_len)


def spread_windows(ids: torch.Tensor, seq_len: int, num_windows: int) -> torch.Tensor:
    """`num_windows` non-overlapping windows spaced evenly over the text: (num_windows, seq_len)."""
    available = ids.numel() // seq_len
    if available < num_windows:
        raise ValueError(f"text has {ids.numel()} tokens: {available} windows of {seq_len}, {num_windows} requested")
    starts = torch.linspace(0, available - 1, num_windows).round().long() * seq_len
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
