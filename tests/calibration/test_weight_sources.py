"""Weight sources: whichever source the calibration pipeline reads the full-precision weights from,
the result is quantize()'s on the full-precision model in memory, bit for bit.

`calibration/pipeline.py: run(model, config, forward_loop, source)` is the one code path of every
entry point; only the weight source differs (`calibration/sources.py`). The in-memory source is the
reference: `quantize()` on the full-precision model read from the same checkpoint, with the same
config and the same data, computed once per case. Every other source is checked on a few
(model, qformat, algorithm) cases, not on all of them (a cross product would prove the same code
path many times over): TABLE says which. A row asserts that the state_dict (keys, dtypes, values)
and `expert_token_counts` (MoE) are the reference's.

What the entry points do besides (warnings, the recorded config, saving, device maps, that a load
calibration follows quantizes nothing itself) is tested with them: tests/hf/test_hf_load_time.py,
test_load_time_algorithms.py, test_load_time_calibration.py, test_hf_placement.py, tests/calibration/test_moe.py.
"""

import contextlib
import dataclasses
import random
from dataclasses import dataclass

import pytest
import torch
from accelerate import cpu_offload
from accelerate.utils import align_module_device, has_offloaded_params
from conftest import WORDS, tiny_llama, tiny_moe, word_tokenizer
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import FORMATS, PTQConfig, calibrate, quantize
from hf_ptq_plugin.calibration.data import calibration_forward_loop

MODELS = {  # the full-precision checkpoints, fp32 unless named otherwise
    "llama": tiny_llama,
    "llama_mha": lambda: tiny_llama(kv_heads=4),  # k/v_proj of 128 rows: fp8_pb_wo's 128x128 blocks fit
    "llama_bf16": lambda: tiny_llama().to(torch.bfloat16),
    "qwen3_moe": lambda: tiny_moe("qwen3_moe"),
    "mixtral": lambda: tiny_moe("mixtral"),
}
CALIB = {"calib_size": 8, "calib_seq_len": 32, "calib_batch_size": 4}
# Layer 1, the final norm and the LM head on disk (accelerate hooks load them for each forward),
# the rest in memory: on a machine without a GPU, "cpu" is where the model computes, not an offload.
DISK_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.norm": "disk", "lm_head": "disk"}


@dataclass(frozen=True)
class Case:
    model: str
    qformat: str
    algorithm: str
    kv_cache_qformat: str = "none"
    sequential: bool = True

    @property
    def config(self) -> PTQConfig:
        return PTQConfig(qformat=self.qformat, algorithm=self.algorithm, kv_cache_qformat=self.kv_cache_qformat,
                         sequential=self.sequential)

    @property
    def id(self) -> str:
        extra = [f"kv_{self.kv_cache_qformat}"] if self.kv_cache_qformat != "none" else []
        return "-".join([self.model, self.qformat, self.algorithm] + extra + ([] if self.sequential else ["parallel"]))


class Files:
    """The source checkpoints (each with its tokenizer, written on first use) and the calibration data."""

    def __init__(self, directory):
        self.directory = directory
        random.seed(0)
        self.calib = directory / "calib.txt"
        self.calib.write_text(" ".join(random.choice(WORDS) for _ in range(2000)))
        self.loop = calibration_forward_loop(word_tokenizer(), str(self.calib), CALIB["calib_size"],
                                             CALIB["calib_seq_len"], CALIB["calib_batch_size"])

    def checkpoint(self, model: str):
        path = self.directory / model
        if not path.exists():
            MODELS[model]().save_pretrained(path)
            word_tokenizer().save_pretrained(path)
        return path

    def data(self, case: Case):
        """The forward loop of every source of `case`: none when nothing in it reads activations."""
        return self.loop if case.config.needs_calibration_data else None

    def load_config(self, case: Case) -> PTQConfig:
        """`case`'s config for from_pretrained: the same data as a file (calib_dataset) when it needs data."""
        if not case.config.needs_calibration_data:
            return case.config
        return dataclasses.replace(case.config, calib_dataset=str(self.calib), **CALIB)


# The sources: each returns the model quantized from its weights.

def in_memory_offloaded_to_cpu(case: Case, files: Files, tmp_path):
    """quantize() on a model whose every weight accelerate keeps in a CPU map, loaded for each forward."""
    model = AutoModelForCausalLM.from_pretrained(files.checkpoint(case.model))
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert has_offloaded_params(model.model.layers[0].self_attn.q_proj)
    return quantize(model, case.config, files.data(case))


def in_memory_offloaded_to_disk(case: Case, files: Files, tmp_path):
    """quantize() on a model loaded with part of its weights offloaded to disk (device_map, offload_folder)."""
    model = AutoModelForCausalLM.from_pretrained(files.checkpoint(case.model), device_map=DISK_MAP,
                                                 offload_folder=str(tmp_path / "offload"))
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert has_offloaded_params(model.model.layers[1].self_attn.q_proj)
    return quantize(model, case.config, files.data(case))


def checkpoint_while_loading(case: Case, files: Files, tmp_path):
    """from_pretrained(src, quantization_config=PTQConfig(...)). max / mse: each weight is quantized
    as it is read, then static scales and the KV cache are calibrated on calib_dataset; a
    layer-streamed algorithm calibrates on calib_dataset right after loading, reading every block
    from the checkpoint."""
    return AutoModelForCausalLM.from_pretrained(files.checkpoint(case.model),
                                                quantization_config=files.load_config(case))


def checkpoint_via_calibrate(case: Case, files: Files, tmp_path):
    """A compressed load without data (rounded to nearest), then calibrate(model, data) with the config's algorithm."""
    model = AutoModelForCausalLM.from_pretrained(files.checkpoint(case.model), quantization_config=case.config)
    return calibrate(model, str(files.calib), tokenizer=word_tokenizer(), calib_size=CALIB["calib_size"],
                     seq_len=CALIB["calib_seq_len"], batch_size=CALIB["calib_batch_size"])


def checkpoint_of_an_offloaded_load(case: Case, files: Files, tmp_path):
    """A compressed load with part of the model offloaded to disk, then calibrate(model, forward_loop)."""
    model = AutoModelForCausalLM.from_pretrained(files.checkpoint(case.model), quantization_config=case.config,
                                                 device_map=DISK_MAP, offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(model.hf_device_map.values())
    return calibrate(model, files.loop)


# The cases. max with every qformat (fp8_pb_wo needs 128-row k/v_proj; w4a16_nvfp4 runs in bf16).
MAX = {name: Case("llama_mha" if name == "fp8_pb_wo" else "llama_bf16" if name == "w4a16_nvfp4" else "llama", name,
                  "max") for name in FORMATS}
MSE = Case("llama", "int4_awq", "mse")
MSE_KV = Case("llama", "int4_awq", "mse", kv_cache_qformat="fp8")  # streamed from the checkpoint for the KV scales
SMOOTHQUANT = Case("llama", "int8_sq", "smoothquant")
AWQ_LITE = Case("llama", "int4_awq", "awq_lite")
AWQ_FULL = Case("llama", "w4a8_awq", "awq_full")
GPTQ_KV = Case("llama", "nvfp4", "gptq", kv_cache_qformat="fp8")  # the KV cache's k/v scales too
MAX_EXPERTS = Case("mixtral", "nvfp4", "max")
MSE_EXPERTS = Case("qwen3_moe", "int4_awq", "mse")
SMOOTHQUANT_EXPERTS = Case("mixtral", "int8_sq", "smoothquant")
AWQ_LITE_EXPERTS_PARALLEL = Case("qwen3_moe", "int4_awq", "awq_lite", sequential=False)
AWQ_FULL_EXPERTS = Case("qwen3_moe", "w4a8_awq", "awq_full")
GPTQ_EXPERTS = Case("mixtral", "int4_awq", "gptq")
GPTQ_EXPERTS_NVFP4 = Case("qwen3_moe", "nvfp4", "gptq")

TABLE = {  # source: the cases it is checked on
    in_memory_offloaded_to_cpu: [AWQ_LITE, GPTQ_EXPERTS_NVFP4],
    in_memory_offloaded_to_disk: [MAX["fp8"], MSE, SMOOTHQUANT, AWQ_FULL, GPTQ_KV, AWQ_FULL_EXPERTS, GPTQ_EXPERTS],
    checkpoint_while_loading: [*MAX.values(), MSE, SMOOTHQUANT, AWQ_LITE, AWQ_FULL, GPTQ_KV, MAX_EXPERTS, MSE_EXPERTS,
                               AWQ_LITE_EXPERTS_PARALLEL],
    checkpoint_via_calibrate: [MAX["fp8"], MSE_KV, GPTQ_KV, SMOOTHQUANT_EXPERTS, AWQ_LITE_EXPERTS_PARALLEL,
                               AWQ_FULL_EXPERTS, GPTQ_EXPERTS],
    checkpoint_of_an_offloaded_load: [AWQ_FULL, GPTQ_EXPERTS_NVFP4],
}

ROWS = [pytest.param(source, case, id=f"{source.__name__}-{case.id}")
        for source, cases in TABLE.items() for case in cases]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return Files(tmp_path_factory.mktemp("weight_sources"))


@pytest.fixture(scope="module")
def reference(files):
    """quantize() on the full-precision model in memory, once per case."""
    cache = {}

    def of(case: Case):
        if case not in cache:
            model = AutoModelForCausalLM.from_pretrained(files.checkpoint(case.model))
            cache[case] = quantize(model, case.config, files.data(case))
        return cache[case]

    return of


def state_dict(model):
    """The model's state_dict, with the tensors accelerate keeps offloaded read back."""
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            if has_offloaded_params(module):
                stack.enter_context(align_module_device(module))
        return {key: tensor.clone() for key, tensor in model.state_dict().items()}


@pytest.mark.parametrize("source, case", ROWS)
def test_every_weight_source_gives_the_tensors_of_quantize_in_memory(source, case, files, reference, tmp_path):
    model = source(case, files, tmp_path)
    expected, found = state_dict(reference(case)), state_dict(model)
    assert found.keys() == expected.keys()
    assert not [k for k in expected if found[k].dtype != expected[k].dtype]
    assert not [k for k in expected if not torch.equal(found[k], expected[k])]
    counts = getattr(model, "expert_token_counts", None)
    assert counts == getattr(reference(case), "expert_token_counts", None)
    if case.model in ("qwen3_moe", "mixtral"):
        assert (counts is not None) == (files.data(case) is not None)  # counted whenever data ran
