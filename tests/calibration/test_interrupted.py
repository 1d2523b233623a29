"""An exception in the middle of calibration leaves a model that refuses to be used, saved or
quantized again: never a silently half-rescaled one."""

import pytest
import torch
from conftest import tiny_llama

from hf_ptq_plugin import PTQConfig, calibrate, export_checkpoint, quantize
from hf_ptq_plugin.calibration import algorithms
from hf_ptq_plugin.calibration.interrupted import CalibrationInterrupted

STREAMED = [(fmt, name) for fmt, name in (("int8_sq", "smoothquant"), ("int4_awq", "awq_lite"),
                                           ("int4_awq", "awq_clip"), ("int4_awq", "awq_full"), ("int4_awq", "gptq"))]


class Boom(Exception):
    pass


def failing_in_block(monkeypatch, algorithm_name, block):
    """Make the algorithm's block planning raise in block `block`, after it has started changing weights."""
    algorithm = algorithms.get_algorithm(algorithm_name)
    original, calls = type(algorithm).plan_block, []

    def plan_block(self, context, linears):
        calls.append(1)
        plans = original(self, context, linears)  # smoothing algorithms have rescaled the weights by now
        if len(calls) == block + 1:
            raise Boom(f"injected in block {block}")
        return plans

    monkeypatch.setattr(type(algorithm), "plan_block", plan_block)


@pytest.mark.parametrize("qformat,algorithm", STREAMED)
@pytest.mark.parametrize("block", [0, 1])
def test_a_failure_in_any_block_makes_the_model_refuse_further_use(qformat, algorithm, block, monkeypatch,
                                                                    token_ids, tmp_path):
    model = tiny_llama()
    failing_in_block(monkeypatch, algorithm, block)
    with pytest.raises(Boom):
        quantize(model, PTQConfig(qformat=qformat, algorithm=algorithm), forward_loop=lambda m: m(token_ids))
    monkeypatch.undo()
    with pytest.raises(CalibrationInterrupted, match="stopped with Boom: injected in block"):
        model(token_ids)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")  # a good checkpoint the save must not clobber
    with pytest.raises(CalibrationInterrupted):
        model.save_pretrained(tmp_path / "out")
    with pytest.raises(CalibrationInterrupted):
        export_checkpoint(model, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    with pytest.raises(CalibrationInterrupted):
        quantize(model, PTQConfig(qformat=qformat, algorithm=algorithm), forward_loop=lambda m: m(token_ids))
    with pytest.raises(CalibrationInterrupted):
        calibrate(model, lambda m: m(token_ids))


def test_a_failure_before_any_weight_changed_leaves_the_model_as_it_was(token_ids):
    model = tiny_llama()
    with torch.no_grad():
        before = model(token_ids).logits

    def failing_loop(m):
        raise Boom("no data")

    with pytest.raises(Boom):
        quantize(model, PTQConfig(qformat="int4_awq"), forward_loop=failing_loop)
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, before)
