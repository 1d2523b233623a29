"""Calibration / scoring data for the AutoQuantize tests: two left-padded rows of token ids."""

import torch

from hf_ptq_plugin.calibration.data import CalibrationLoop


def token_batch(seed: int = 1, length: int = 24, padding: int = 5) -> dict:
    """{"input_ids", "attention_mask"} (2, length); the second row has `padding` pad tokens on the left."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, 320, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :padding], attention_mask[1, :padding] = 0, 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def calibration_loop(seed: int = 1) -> CalibrationLoop:
    """The loop `calibration_forward_loop` would build over `token_batch(seed)` (padding left out of statistics)."""
    return CalibrationLoop([token_batch(seed)], source="random token ids")
