"""Calibration time of MoE experts per algorithm, on a synthetic Qwen3-MoE.

No MoE model is available offline, so the model is random (Qwen3-MoE's architecture at a small
size, bf16) and so are the token ids: the times are what they are for these shapes, while the
SQNR column (logits of the quantized model against the unquantized one, on the calibration
tokens) is only a sanity check, not an accuracy measurement. Each run starts from a copy of the
same model and is alone on the machine.

    python benchmarks/moe_calibration.py [--runs int4_awq:max,int4_awq:awq_lite,...] [--markdown]
"""

import argparse
import copy
import logging
import time

import torch
from tables import print_table  # benchmarks/tables.py: the script's own directory is on sys.path
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_ptq_plugin import PTQConfig, quantize

DEFAULT_RUNS = "int4_awq:max,int4_awq:awq_lite,int4_awq:awq_full,int4_awq:gptq,int8_sq:smoothquant,nvfp4:max"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated qformat:algorithm pairs")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args()


def synthetic_moe(args) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
                            num_experts=args.experts, num_experts_per_tok=args.top_k, num_hidden_layers=args.layers,
                            num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=2000)
    return Qwen3MoeForCausalLM(config).eval().to(torch.bfloat16)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (reference.float() - approx.float()).pow(2).mean()
    return float(10 * torch.log10(reference.float().pow(2).mean() / noise))


def main():
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    base = synthetic_moe(args)
    ids = torch.randint(0, 2000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    batches = ids.split(4)

    def loop(model):
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch)

    start = time.perf_counter()
    loop(base)
    forward_s = time.perf_counter() - start
    with torch.no_grad():
        reference = base(input_ids=batches[0]).logits
    rows = []
    for run in args.runs.split(","):
        qformat, algorithm = run.split(":")
        model = copy.deepcopy(base)
        start = time.perf_counter()
        quantize(model, PTQConfig(qformat=qformat, algorithm=algorithm), forward_loop=loop)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            sqnr = sqnr_db(reference, model(input_ids=batches[0]).logits)
        rows.append([run, f"{seconds:.1f}", f"{seconds / forward_s:.1f}", f"{sqnr:.1f}"])
        print(f"done: {rows[-1]}", flush=True)
    print(f"synthetic Qwen3-MoE: {args.layers} layers, hidden 1024, {args.experts} experts of intermediate 512, "
          f"top-{args.top_k}; {args.samples} x {args.seq_len} random tokens; one bf16 forward pass over them "
          f"{forward_s:.1f} s; {torch.get_num_threads()} threads")
    header = ["format:algorithm", "calibration s", "x one forward pass", "logits SQNR dB (sanity only)"]
    print_table(header, rows, args.markdown, width=20)


if __name__ == "__main__":
    main()
