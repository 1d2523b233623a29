"""Fuzzing a small fp8 export: every damaged copy fails with a clean error naming what is wrong, or loads to
the original's logits bit for bit.

With a fixed seed, each case changes one thing of a fresh copy: bytes of the safetensors header, one header
field (dtype, shape, data_offsets), bytes of tensor data, bytes of config.json or one key of its
quantization_config, bytes of hf_quant_config.json or one key of its `quantization`. Each case loads in
a child forked from this process (torch, transformers and the plugin already imported, so a case costs a
load, not an import), with a timeout: a hang or a crash (a signal, e.g. a segfault) is a failure. Outcomes:

- clean error: ValueError, OSError, KeyError or SafetensorError whose message names the file, a tensor or
  the changed key (or value);
- identical: loads, logits equal to the original's;
- data changed: logits differ after a change of tensor bytes, or of data_offsets that may point a tensor at
  other bytes (the format has no checksum: such a file is a different, valid one);
- model config: logits differ or the load failed, after a change of config.json outside
  quantization_config (another model, e.g. rms_norm_eps; transformers' own business).

Anything else (another exception type, an error naming nothing, different logits without a reason, a hang,
a crash) is a failure. The counts per outcome are printed (`pytest -s`) and checked to add up.
"""

import copy
import json
import logging
import multiprocessing
import os
import random
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from conftest import tiny_llama
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging

from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize

SEED = 20261204
CASES = 700
TIMEOUT_SECONDS = 30
WEIGHTS, CONFIG, HF_QUANT_CONFIG = "model.safetensors", "config.json", "hf_quant_config.json"
CLEAN_ERRORS = (ValueError, OSError, KeyError, SafetensorError)
ACCEPTED = {"clean error", "identical", "data changed", "model config"}
DTYPES = ["F8_E4M3", "F8_E5M2", "U8", "I8", "BOOL", "BF16", "F16", "I16", "F32", "I32", "U32", "F64", "I64", "X9"]
VALUES = [None, 0, -1, 16, 128, 3.5, True, "", "BOGUS", "fp8", "FP8", "NVFP4", "nvfp4", "none", "int4_awq",
          "W4A16_AWQ", "MIXED_PRECISION", [], ["lm_head"], ["*"], [1, 2], {}, {"num_bits": 8, "type": "float"},
          {"qformat": "fp8"}]
PRINTABLE = [ord(c) for c in ' "{}[],:.0123456789eEaAzZ_-\\']


@dataclass
class Mutation:
    description: str
    names: set  # strings a clean error may name: the file, tensors, keys, values
    data_changed: bool = False
    model_config_changed: bool = False


@dataclass
class Original:
    directory: object
    logits: torch.Tensor
    header: dict
    files: dict = field(default_factory=dict)  # name -> bytes


def token_ids():
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    config = PTQConfig(qformat="fp8", kv_cache_qformat="fp8", algorithm="max")
    model = quantize(tiny_llama(), config, lambda m: m(token_ids()))
    directory = tmp_path_factory.mktemp("fuzz-original")
    export_checkpoint(model, directory)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(directory)(token_ids()).logits
    files = {name: (directory / name).read_bytes() for name in (WEIGHTS, CONFIG, HF_QUANT_CONFIG)}
    return Original(directory, logits, parse_header(files[WEIGHTS]), files)


# --- the safetensors header ---------------------------------------------------------------------------------


def parse_header(data: bytes):
    """The header dict of a safetensors file's bytes, or None if they do not hold one."""
    if len(data) < 8:
        return None
    length = struct.unpack("<Q", data[:8])[0]
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) and 8 + length <= len(data) else None


def with_header(data: bytes, header: dict) -> bytes:
    """`data` with its header replaced (padded with spaces to 8 bytes, as safetensors writes it)."""
    length = struct.unpack("<Q", data[:8])[0]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


def tensor_names(header) -> set:
    return {name for name in (header or {}) if name != "__metadata__"}


def header_names(original: Original, new_header=None) -> set:
    return {WEIGHTS} | tensor_names(original.header) | tensor_names(new_header)


def mutate_header_bytes(rng: random.Random, directory, original: Original) -> Mutation:
    data = bytearray(original.files[WEIGHTS])
    end = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    positions = [rng.randrange(end) for _ in range(rng.choice([1, 1, 2, 3]))]
    for position in positions:
        data[position] = rng.choice(PRINTABLE + [rng.randrange(256)])
    (directory / WEIGHTS).write_bytes(bytes(data))
    new_header = parse_header(bytes(data))
    mutation = Mutation(f"{WEIGHTS} header bytes at {positions}", header_names(original, new_header))
    if new_header is not None:
        mutation.data_changed = any(new_header[name].get("data_offsets") != original.header[name]["data_offsets"]
                                  for name in tensor_names(new_header) & tensor_names(original.header)
                                  if isinstance(new_header[name], dict))
    return mutation


def mutate_header_field(rng: random.Random, directory, original: Original) -> Mutation:
    header = copy.deepcopy(original.header)
    name = rng.choice(sorted(tensor_names(header)))
    entry = header[name]
    kind = rng.choice(["dtype", "shape", "data_offsets"])
    if kind == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == "shape":
        entry["shape"] = changed_shape(rng, entry["shape"])
    else:
        entry["data_offsets"] = changed_offsets(rng, entry["data_offsets"], header)
    (directory / WEIGHTS).write_bytes(with_header(original.files[WEIGHTS], header))
    return Mutation(f"{WEIGHTS} {name}.{kind} = {entry[kind]}", header_names(original) | {kind},
                    data_changed=kind == "data_offsets")


def changed_shape(rng: random.Random, shape: list):
    choices = [shape + [1], [1] + shape, shape[:-1], [], [0], [-1], "128", [2 ** 40]]
    if shape:
        index = rng.randrange(len(shape))
        for value in (shape[index] + 1, shape[index] - 1, shape[index] * 2, shape[index] // 2):
            choices.append(shape[:index] + [value] + shape[index + 1:])
    if len(shape) == 2:
        choices.append(shape[::-1])
    return rng.choice(choices)


def changed_offsets(rng: random.Random, offsets: list, header: dict):
    begin, end = offsets
    others = [entry["data_offsets"] for name, entry in header.items()
              if name != "__metadata__" and entry["data_offsets"] != offsets]
    same_size = [o for o in others if o[1] - o[0] == end - begin]
    choices = [[begin + 1, end + 1], [begin - 1, end - 1], [end, begin], [begin, end + 8], [begin, 2 ** 50],
               rng.choice(others), [str(begin), end], [begin]]
    if same_size:
        choices.append(rng.choice(same_size))  # points at another tensor's bytes: a valid, different file
    return rng.choice(choices)


def mutate_tensor_bytes(rng: random.Random, directory, original: Original) -> Mutation:
    data = bytearray(original.files[WEIGHTS])
    start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    positions = [rng.randrange(start, len(data)) for _ in range(rng.choice([1, 2, 8]))]
    for position in positions:
        data[position] = rng.randrange(256)
    (directory / WEIGHTS).write_bytes(bytes(data))
    return Mutation(f"{WEIGHTS} tensor bytes at {positions}", header_names(original), data_changed=True)


# --- the JSON files -----------------------------------------------------------------------------------------


def mutate_json_bytes(file_name: str):
    def mutate(rng: random.Random, directory, original: Original) -> Mutation:
        data = bytearray(original.files[file_name])
        positions = [rng.randrange(len(data)) for _ in range(rng.choice([1, 1, 2]))]
        for position in positions:
            data[position] = rng.choice(PRINTABLE + [rng.randrange(256)])
        (directory / file_name).write_bytes(bytes(data))
        mutation = Mutation(f"{file_name} bytes at {positions}", {file_name} | keys_of(json_or_none(data)))
        if file_name == CONFIG:
            mutation.model_config_changed = model_config_changed(json_or_none(data), original)
        return mutation
    return mutate


def json_or_none(data: bytes):
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def keys_of(value) -> set:
    """Every key of a parsed JSON value, at any depth (a changed key is what an error may name)."""
    if isinstance(value, dict):
        return set(map(str, value)) | set().union(*map(keys_of, value.values()))
    if isinstance(value, list):
        return set().union(*map(keys_of, value)) if value else set()
    return set()


def model_config_changed(config, original: Original) -> bool:
    """config.json parses and differs from the original outside quantization_config."""
    if not isinstance(config, dict):
        return False
    before = json.loads(original.files[CONFIG])
    strip = ("quantization_config",)
    return {k: v for k, v in config.items() if k not in strip} != {k: v for k, v in before.items() if k not in strip}


def mutate_quantization_config(rng: random.Random, directory, original: Original) -> Mutation:
    config = json.loads(original.files[CONFIG])
    quantization = config["quantization_config"]
    path = rng.choice(sorted([("",)] + [(k,) for k in quantization] + [("ptq_config", k)
                                                                     for k in quantization["ptq_config"]]))
    names = {CONFIG, "quantization_config"}
    description = mutate_at(rng, config, ("quantization_config",) + tuple(p for p in path if p), names)
    (directory / CONFIG).write_text(json.dumps(config))
    return Mutation(f"{CONFIG} {description}", names)


def mutate_hf_quant_config(rng: random.Random, directory, original: Original) -> Mutation:
    values = json.loads(original.files[HF_QUANT_CONFIG])
    path = rng.choice(sorted([("quantization",), ("producer",)] + [("quantization", k)
                                                                  for k in values["quantization"]]))
    names = {HF_QUANT_CONFIG, "quantization"}
    description = mutate_at(rng, values, path, names)
    (directory / HF_QUANT_CONFIG).write_text(json.dumps(values))
    return Mutation(f"{HF_QUANT_CONFIG} {description}", names)


def mutate_at(rng: random.Random, values: dict, path: tuple, names: set) -> str:
    """Delete, replace or add a key at `path` of `values`; adds the key and value to `names`."""
    parent = values
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    names.update(map(str, path))
    action = rng.choice(["delete", "set", "set", "set", "add"] if isinstance(parent[key], dict) else
                        ["delete", "set", "set", "set"])
    if action == "delete":
        del parent[key]
        return f"del {'.'.join(path)}"
    value = rng.choice(VALUES)
    names.update(keys_of(value))
    if not isinstance(value, (dict, list)) and value != "":
        names.add(str(value))
    if action == "add":
        parent[key]["unknown_key"] = value
        names.add("unknown_key")
        return f"{'.'.join(path)}.unknown_key = {value!r}"
    parent[key] = value
    return f"{'.'.join(path)} = {value!r}"


MUTATORS = [mutate_header_bytes, mutate_header_field, mutate_tensor_bytes, mutate_json_bytes(CONFIG),
            mutate_quantization_config, mutate_json_bytes(HF_QUANT_CONFIG), mutate_hf_quant_config]


# --- one case in a forked child --------------------------------------------------------------------------------


def load_in_child(directory, reference: torch.Tensor, sender) -> None:
    """Runs in the forked child: load, compare the logits, send the outcome."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    torch.set_num_threads(1)  # the parent's thread pool does not survive the fork
    transformers_logging.disable_progress_bar()
    reports = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory)
        with torch.no_grad():
            logits = model(token_ids()).logits
        same = logits.shape == reference.shape and torch.equal(logits, reference)
        report = " ".join(r for r in reports if "LOAD REPORT" in r)
        sender.send(("identical" if same else "different", report))
    except BaseException as error:  # noqa: BLE001 - every exception is an outcome to classify
        sender.send(("error", isinstance(error, CLEAN_ERRORS), f"{type(error).__name__}: {error}"))


def run_case(directory, reference: torch.Tensor):
    """(outcome, detail) of loading `directory` in a forked child; ("hang"|"crash", ...) if it gives none."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=load_in_child, args=(directory, reference, sender))
    process.start()
    sender.close()
    try:
        result = receiver.recv() if receiver.poll(TIMEOUT_SECONDS) else ("hang", f"no result in {TIMEOUT_SECONDS} s")
    except EOFError:
        result = None
    process.join(TIMEOUT_SECONDS if result is not None and result[0] != "hang" else 0)
    if process.is_alive():
        process.kill()
        process.join()
    if result is None:
        return "crash", f"exit code {process.exitcode}"
    return result


def classify(mutation: Mutation, result, tensors: set) -> str:
    """The outcome class of one case; `tensors`: the checkpoint's tensor names (a clean error may name one)."""
    outcome, *detail = result
    if outcome == "identical":
        return "identical"
    if outcome in ("hang", "crash"):
        return outcome
    if mutation.model_config_changed:
        return "model config"
    if outcome == "error":
        clean, message = detail
        if not clean:
            return "unclean error"
        named = any(name in message for name in mutation.names | tensors)
        return "clean error" if named else "error naming nothing"
    return "data changed" if mutation.data_changed else "silent wrong load"


def test_fuzzed_checkpoints_fail_cleanly_or_load_exactly(original, tmp_path):
    rng = random.Random(SEED)
    counts, failures = Counter(), []
    for index in range(CASES):
        directory = shutil.copytree(original.directory, tmp_path / f"case{index}")
        mutation = MUTATORS[index % len(MUTATORS)](rng, directory, original)
        result = run_case(directory, original.logits)
        outcome = classify(mutation, result, tensor_names(original.header))
        counts[outcome] += 1
        if outcome not in ACCEPTED:
            failures.append(f"case {index} ({mutation.description}): {outcome}: {result}")
        shutil.rmtree(directory)
    print(f"\nfuzz outcomes over {CASES} cases (seed {SEED}): {dict(sorted(counts.items()))}")
    assert not failures, "\n".join(failures)
    assert sum(counts.values()) == CASES and counts["clean error"] > 0 and counts["identical"] > 0
