"""The accuracy/size frontier from one search: each budget's model evaluated from the stored candidates."""

import csv

import pytest
import torch
from autoquant_data import calibration_loop, token_batch
from conftest import tiny_llama

from hf_ptq_plugin import auto_quantize
from hf_ptq_plugin.autoquant.frontier import write_frontier


def batch_loss(model) -> float:
    batch = token_batch(seed=7)
    with torch.no_grad():
        return model(**batch, labels=batch["input_ids"]).loss.item()


@pytest.fixture(scope="module")
def frontier_search():
    baseline = batch_loss(tiny_llama())
    model, result = auto_quantize(tiny_llama(), ["fp8", "nvfp4"], 6.0, calibration_loop(),
                                  frontier_bits=[16.0, 4.5, 6.0, 8.0], evaluate=batch_loss)
    return baseline, model, result


def test_each_budget_is_solved_and_evaluated_in_ascending_order(frontier_search):
    _, _, result = frontier_search
    assert [p["target_bits"] for p in result.frontier] == [4.5, 6.0, 8.0, 16.0]
    for point in result.frontier:
        solved = result.solve(point["target_bits"])
        assert point["effective_bits"] == solved.effective_bits <= point["target_bits"]
        assert point["stored_bits"] == solved.true_bits
        assert sum(point["formats"].values()) == len(result.groups)
    assert result.frontier[0]["formats"] == {"nvfp4": len(result.groups)}  # the cheapest budget
    assert len({p["metric"] for p in result.frontier}) == len(result.frontier)  # each its own model


def test_the_points_are_the_models_they_describe(frontier_search):
    baseline, model, result = frontier_search
    # 16 bits keeps every layer in full precision: the original Linears were back in the model.
    assert result.frontier[-1]["formats"] == {"none": len(result.groups)}
    assert result.frontier[-1]["metric"] == baseline
    # No AWQ and no KV cache here, so the assembled model at the search's budget is that point exactly.
    at_target = next(p for p in result.frontier if p["target_bits"] == 6.0)
    assert at_target["metric"] == batch_loss(model)


def test_the_frontier_is_written_as_csv_and_png(frontier_search, tmp_path):
    from hf_ptq_plugin.autoquant.frontier import FrontierPoint

    _, _, result = frontier_search
    points = [FrontierPoint(**p) for p in result.frontier]
    csv_path, png_path = write_frontier(points, tmp_path / "plots" / "frontier", metric_name="loss")
    rows = list(csv.DictReader(csv_path.open()))
    assert [float(r["target_bits"]) for r in rows] == [4.5, 6.0, 8.0, 16.0]
    assert [float(r["metric"]) for r in rows] == [p.metric for p in points]
    assert rows[0]["formats"] == f"nvfp4:{len(result.groups)}"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, message", [
    (dict(frontier_bits=[6.0]), r"frontier_bits needs evaluate=lambda model"),
    (dict(frontier_bits=["6"], evaluate=batch_loss), r"frontier_bits must be numbers"),
    (dict(frontier_bits=[3.0], evaluate=batch_loss), r"outside the achievable range \[8, 16\]"),
])
def test_bad_frontier_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        auto_quantize(tiny_llama(layers=1), ["fp8"], 8.0, calibration_loop(), **kwargs)
