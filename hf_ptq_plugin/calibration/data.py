"""Calibration data: from texts, files, datasets or token tensors to a forward loop.

`calibration_forward_loop(tokenizer, data, ...)` accepts a local path (.txt, .json/.jsonl,
.parquet, or a folder of them), a list of strings, a `datasets.Dataset`, a hub dataset name, or
a (N, S) tensor of token ids, and returns a forward loop for `quantize()`. Selection is
deterministic: records are taken in order (a plain-text file is one corpus, cut into windows
spread evenly over it). Shorter samples are left-padded within a batch, and the loop publishes
which tokens are real (`loop.token_mask`), so padding never enters a calibration statistic.
"""

import json
import logging
from pathlib import Path
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from .offload import input_device
from .record import describe_source
from .text import spread_windows, tokenize, utf8_text

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "article", "content", "document")  # cnn_dailymail's field is "article"
FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")


class TokenMask:
    """Which tokens of the batch now running are real: (B, S) bool, or None when all are."""

    def __init__(self):
        self.mask: Optional[torch.Tensor] = None

    def real_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, K) -> (T, K), dropping padded positions; other shapes pass through flattened."""
        if self.mask is not None and x.shape[:-1] == self.mask.shape:
            return x[self.mask.to(x.device)]
        return x.reshape(-1, x.shape[-1])


class CalibrationLoop:
    """A forward loop over fixed batches; `token_mask` tells hooks which tokens are padding."""

    def __init__(self, batches: List[dict], source: str = ""):
        self.batches, self.token_mask = batches, TokenMask()
        self.source = source  # what the samples came from, for the model card (record.py)

    def __call__(self, model) -> None:
        device = input_device(model)
        try:
            with torch.no_grad():
                for batch in tqdm(self.batches, desc="calibration batches", leave=False, disable=None):
                    self.token_mask.mask = batch["attention_mask"].bool()
                    model(**{k: v.to(device) for k, v in batch.items()}, **_positions(batch, device))
        finally:
            self.token_mask.mask = None


def _positions(batch: dict, device) -> dict:
    """position_ids for a left-padded text batch: counting real tokens only, a sample sees the same
    rotary positions as it would alone. None for image batches (images.py), which are right-padded:
    the model computes its own, multimodal ones (Qwen2-VL's 3-D rotary positions) included."""
    if "pixel_values" in batch:
        return {}
    return {"position_ids": (batch["attention_mask"].cumsum(dim=-1) - 1).clamp(min=0).to(device)}


def calibration_forward_loop(tokenizer, data, calib_size: int = 512, seq_len: int = 512,
                             batch_size: int = 4) -> CalibrationLoop:
    """A forward loop over `calib_size` samples of at most `seq_len` tokens from `data`."""
    samples = _token_samples(tokenizer, data, calib_size, seq_len)
    batches = [_left_pad(samples[i:i + batch_size], tokenizer) for i in range(0, len(samples), batch_size)]
    return CalibrationLoop(batches, source=describe_source(data))


def _token_samples(tokenizer, data, calib_size: int, seq_len: int) -> List[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or 0 in data.shape:
            raise ValueError(f"token-id calibration data must be a non-empty (N, S) tensor, "
                             f"got shape {tuple(data.shape)}")
        if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
            raise ValueError(f"token-id calibration data must hold integer token ids, got dtype {data.dtype}")
        return list(data[:calib_size, :seq_len])
    if isinstance(data, (str, Path)) and Path(data).is_file() and Path(data).suffix == ".txt":
        ids = tokenize(tokenizer, utf8_text(Path(data)))
        if ids.numel() < seq_len:
            raise ValueError(f"calibration text {str(data)!r} has {ids.numel()} tokens, "
                             f"fewer than calib_seq_len={seq_len}")
        return list(spread_windows(ids, seq_len, min(calib_size, ids.numel() // seq_len)))
    texts = [t for t in load_texts(data) if t.strip()][:calib_size]
    if not texts:
        raise ValueError(f"calibration data {_describe(data)} holds no non-empty text")
    return [ids[:seq_len] for ids in (tokenize(tokenizer, t) for t in texts) if ids.numel() > 0]


def _left_pad(samples: List[torch.Tensor], tokenizer) -> dict:
    """Left-pad a list of 1-D token tensors to the longest: {"input_ids", "attention_mask"} (B, S)."""
    length = max(s.numel() for s in samples)
    # Any id pads: padded positions are masked out of attention and of every statistic.
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else getattr(tokenizer, "eos_token_id", None) or 0
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, length - sample.numel():] = sample
        attention_mask[row, length - sample.numel():] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def load_texts(data) -> List[str]:
    """Texts from a list of strings, a datasets.Dataset, a local file or folder, or a hub dataset name."""
    if isinstance(data, (list, tuple)):
        if not all(isinstance(t, str) for t in data):
            raise ValueError("a calibration list must hold strings")
        return list(data)
    if hasattr(data, "column_names"):  # a datasets.Dataset
        return list(data[_text_field(data.column_names, "dataset")])
    path = Path(data)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in FILE_SUFFIXES)
        if not files:
            raise ValueError(f"calibration folder {str(path)!r} has no {'/'.join(FILE_SUFFIXES)} files")
        return [text for f in files for text in load_texts(f)]
    if path.is_file():
        return _texts_from_file(path)
    return _texts_from_hub(str(data))


def _texts_from_file(path: Path) -> List[str]:
    if path.suffix == ".txt":
        return [utf8_text(path)]
    if path.suffix == ".parquet":
        import datasets

        return load_texts(datasets.Dataset.from_parquet(str(path)))
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"calibration file {str(path)!r}: unsupported type; valid: {', '.join(FILE_SUFFIXES)}")
    records = _json_records(path)
    if records and isinstance(records[0], str):
        return records
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"calibration file {str(path)!r}: records must be strings or objects with a text field, "
                         f"found {type(next(r for r in records if not isinstance(r, dict))).__name__}")
    field = _text_field(list(records[0]) if records else [], str(path))
    return [record[field] for record in records]


def _json_records(path: Path) -> list:
    """The records of a .jsonl (one per line) or .json file (a list, or one record)."""
    if path.suffix == ".json":
        records = _parse_json(utf8_text(path), path, "")
        return records if isinstance(records, list) else [records]
    return [_parse_json(line, path, f" (line {number})")
            for number, line in enumerate(utf8_text(path).splitlines(), 1) if line.strip()]


def _parse_json(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"calibration file {str(path)!r}{where} is not valid JSON: {error}") from None


def _texts_from_hub(name: str) -> List[str]:
    import datasets

    config = "3.0.0" if name in ("cnn_dailymail", "abisee/cnn_dailymail") else None
    try:
        dataset = datasets.load_dataset(name, config, split="train")
    except (OSError, ValueError) as error:  # ConnectionError and DatasetNotFoundError are OSErrors
        raise ValueError(f"calibration data {name!r} is not a local file or folder, and loading it from the Hugging "
                         f"Face Hub failed ({type(error).__name__}: {error}); offline, pass a local path, a list of "
                         "strings or a datasets.Dataset") from error
    return load_texts(dataset)


def _text_field(columns, where: str) -> str:
    for field in TEXT_FIELDS:
        if field in columns:
            return field
    raise ValueError(f"calibration data {where}: no text column among {list(columns)}; expected one of {TEXT_FIELDS}")


def _describe(data) -> str:
    return repr(data) if isinstance(data, (str, Path)) else type(data).__name__
