"""The algorithm table: one place for valid (format, algorithm) pairs; every algorithm on a model
without decoder blocks (the whole model is one block)."""

import pytest
import torch
from torch import nn

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.calibration.algorithms import ALGORITHMS, algorithms_for, get_algorithm
from hf_ptq_plugin.formats import FORMATS
from hf_ptq_plugin.modules.quant_linear import QuantLinear


def test_every_format_default_is_a_registered_algorithm_that_fits_it():
    for fmt in FORMATS.values():
        assert get_algorithm(fmt.default_algorithm).fits(fmt), fmt.name
        assert fmt.default_algorithm in algorithms_for(fmt)


def test_unknown_algorithm_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown algorithm 'awq'; valid: max, smoothquant, awq_lite"):
        get_algorithm("awq")


def test_config_and_table_agree_on_every_pair():
    for fmt in FORMATS.values():
        for name, algorithm in ALGORITHMS.items():
            if algorithm.fits(fmt):
                PTQConfig(qformat=fmt.name, algorithm=name)
            else:
                with pytest.raises(ValueError, match=f"valid for it: {', '.join(algorithms_for(fmt))}"):
                    PTQConfig(qformat=fmt.name, algorithm=name)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(128, 256), nn.Linear(256, 128)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


PAIRS = [(fmt.name, name) for fmt in FORMATS.values() for name in algorithms_for(fmt)
         if fmt.name in ("int4_awq", "int8_sq", "nvfp4_awq", "fp8")]


@pytest.mark.parametrize("qformat,algorithm", PAIRS + [("int4_awq", None)])
def test_a_model_without_decoder_blocks_quantizes_with_every_algorithm(qformat, algorithm):
    torch.manual_seed(0)
    model, x = TwoLinears(), torch.randn(4, 16, 128)
    reference = model(x)

    def loop(m):
        for batch in x.split(2):
            m(batch)

    quantize(model, PTQConfig(qformat=qformat, algorithm=algorithm), forward_loop=loop)
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    error = (model(x) - reference).pow(2).mean() / reference.pow(2).mean()
    assert error < 0.05, error
