"""Two CPU processes (gloo), each calibrating half of the data, agree with one process on all of it."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_llama, tiny_moe

from hf_ptq_plugin import PTQConfig, QuantLinear, quantize
from hf_ptq_plugin.calibration.expert_observer import ExpertStats
from hf_ptq_plugin.calibration.gptq import HessianStats

# (model, qformat, algorithm, kv cache): the MoE runs stream block by block and give the experts
# input scales from per-expert amax reduced across the processes; with AWQ also the experts' shared
# pre_quant_scales (losses summed over processes) and clipping.
RUNS = [("llama", "fp8", "max", "fp8"), ("llama", "int8_sq", "smoothquant", "none"),
        ("llama", "w4a8_awq", "awq_lite", "nvfp4"), ("qwen3_moe", "int8_sq", "smoothquant", "none"),
        ("qwen3_moe", "w4a8_awq", "awq_full", "none")]
MODELS = {"llama": tiny_llama, "qwen3_moe": lambda: tiny_moe("qwen3_moe")}


def calibration_ids():
    torch.manual_seed(3)
    return torch.randint(0, 320, (4, 32))


def quantized_state(model_name, qformat, algorithm, kv, ids):
    model = MODELS[model_name]()
    quantize(model, PTQConfig(qformat=qformat, algorithm=algorithm, kv_cache_qformat=kv),
             forward_loop=lambda m: [m(batch[None]) for batch in ids])
    return {k: v.clone() for k, v in model.state_dict().items()
            if any(k.startswith(n) for n, m in model.named_modules() if isinstance(m, QuantLinear))}


def hessian_inputs():
    torch.manual_seed(4)
    return list(torch.randn(6, 10, 16).unbind())


def expert_inputs():
    """(expert, gate/up inputs, down inputs) chunks; expert 2 only in rank 0's share, expert 3 in none."""
    torch.manual_seed(5)
    return [(e, torch.randn(5, 16), torch.randn(5, 8)) for e in (0, 1, 2, 1, 0, 1)]


def expert_stats(chunks):
    stats = ExpertStats(4, input_dims={"gate_up": 16, "down": 8})
    stats.allocate_hessians()
    for e, gate_up_x, down_x in chunks:
        stats.tokens[e] += gate_up_x.shape[0]
        stats.observe(e, "gate_up", gate_up_x)
        stats.observe(e, "down", down_x)
    stats.reduce_across_processes()
    return stats


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        ids = calibration_ids()[rank::2]  # this process's half of the samples
        for run in RUNS:
            results[(rank,) + run] = quantized_state(*run, ids)
        hessian = HessianStats()
        for chunk in hessian_inputs()[rank::2]:
            hessian.update(chunk)
        hessian.reduce_across_processes()
        results[(rank, "hessian")] = (hessian.hessian, hessian.num_tokens)
        experts = expert_stats(expert_inputs()[rank::2])
        results[(rank, "experts")] = (experts.tokens, experts.amax, experts.outer)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        return dict(results)


@pytest.mark.parametrize("run", RUNS, ids=[f"{r[0]}-{r[2]}" for r in RUNS])
def test_two_processes_match_one_process(run, two_process_results):
    single = quantized_state(*run, calibration_ids())
    for rank in (0, 1):
        shared = two_process_results[(rank,) + run]
        assert shared.keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(shared[key].float(), value.float(), rtol=1e-5, atol=1e-7, msg=key)


def test_gptq_hessians_reduce_to_the_hessian_of_all_tokens(two_process_results):
    """GPTQ itself is compared through its statistic: its error feedback turns last-bit differences
    of a Hessian summed in another order into one-step rounding flips, so weights cannot match."""
    single = HessianStats()
    for chunk in hessian_inputs():
        single.update(chunk)
    for rank in (0, 1):
        hessian, tokens = two_process_results[(rank, "hessian")]
        assert tokens == single.num_tokens == 60
        torch.testing.assert_close(hessian, single.hessian, rtol=1e-5, atol=1e-6)


def test_expert_hessians_and_counts_reduce_to_those_of_all_tokens(two_process_results):
    single = expert_stats(expert_inputs())
    for rank in (0, 1):
        tokens, amax, outer = two_process_results[(rank, "experts")]
        assert torch.equal(tokens, single.tokens) and tokens.tolist() == [10, 15, 5, 0]
        for kind in ("gate_up", "down"):
            assert torch.equal(amax[kind], single.amax[kind])
            torch.testing.assert_close(outer[kind], single.outer[kind], rtol=1e-5, atol=1e-5)
