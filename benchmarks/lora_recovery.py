"""How much of INT4's accuracy loss a short LoRA run recovers, on SmolLM2-135M (QLoRA-style).

The model is quantized to int4_awq (awq_lite, --calib-samples windows of --seq-len tokens spread
over the five Austen novels other than Pride and Prejudice, as benchmarks/accuracy.py does), then
LoRA adapters on every projection of every decoder layer train for --train-steps steps through
transformers' Trainer on --train-seq-len-token windows of the same five novels; the quantized
weights stay frozen. Perplexity is measured on the first --eval-windows windows of Pride and
Prejudice (held out from both) before and after, and after `merge_and_unload`, which rounds the
adapters into the INT4 grid. A control run trains the same adapters on the unquantized model:
part of any gain is adaptation to Austen's prose, which the unquantized model gets too.

    python benchmarks/lora_recovery.py [--train-steps 40] [--markdown]
"""

import argparse
import logging
import time
from pathlib import Path

import torch
from tables import print_table  # benchmarks/tables.py: the script's own directory is on sys.path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hf_ptq_plugin")
    parser.add_argument("--qformat", default="int4_awq")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the model's dtype (bfloat16: the checkpoint's, and benchmarks/accuracy.py's default)")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration and evaluation window length")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4, help="calibration and evaluation batch size")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--no-control", action="store_true", help="skip the LoRA run on the unquantized model")
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args()


def token_windows(args):
    """(checkpoint path, calibration windows, training windows, evaluation windows)."""
    from austen import calibration_and_eval_texts
    from smollm2 import smollm2_checkpoint
    from transformers import AutoTokenizer

    from hf_ptq_plugin.calibration.text import first_windows, spread_windows, tokenize

    path = smollm2_checkpoint(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    other_novels, pride_and_prejudice = calibration_and_eval_texts(args.cache_dir)
    other_ids = tokenize(tokenizer, other_novels)
    return (path, spread_windows(other_ids, args.seq_len, args.calib_samples),
            spread_windows(other_ids, args.train_seq_len, args.train_steps * args.train_batch_size),
            first_windows(tokenize(tokenizer, pride_and_prejudice), args.seq_len, args.eval_windows))


def load(path, args):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()


def quantized(path, calib_windows, args):
    from hf_ptq_plugin import PTQConfig, quantize

    def forward_loop(model):
        with torch.no_grad():
            for batch in calib_windows.split(args.batch_size):
                model(input_ids=batch)

    model = load(path, args)
    start = time.perf_counter()
    quantize(model, PTQConfig(qformat=args.qformat), forward_loop=forward_loop)
    return model, time.perf_counter() - start


def train_lora(model, train_windows, args, output_dir: Path):
    """LoRA adapters trained by Trainer; returns (PeftModel, first and last logged training loss, seconds)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                                  lora_dropout=0.0))
    training = TrainingArguments(output_dir=str(output_dir), max_steps=args.train_steps,
                                 per_device_train_batch_size=args.train_batch_size, learning_rate=args.learning_rate,
                                 lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                                 use_cpu=True, seed=0, disable_tqdm=True)
    dataset = [{"input_ids": row, "labels": row} for row in train_windows]
    trainer = Trainer(model=peft_model, args=training, train_dataset=dataset)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peft_model.eval()
    return peft_model, (losses[0], losses[-1]), seconds


def row(name, ppl, baseline, losses=None, seconds=None):
    losses = "-" if losses is None else f"{losses[0]:.3f} -> {losses[1]:.3f}"
    return [name, f"{ppl:.2f}", f"{ppl / baseline:.3f}", losses, "-" if seconds is None else f"{seconds:.0f}"]


def main():
    import tempfile

    from hf_ptq_plugin.evaluation import perplexity

    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    path, calib_windows, train_windows, eval_windows = token_windows(args)

    def ppl(model, label):
        return perplexity(model, eval_windows, args.batch_size, progress=label)

    unquantized = load(path, args)
    baseline = ppl(unquantized, "unquantized")
    rows = [row("unquantized", baseline, baseline)]
    model, calib_seconds = quantized(path, calib_windows, args)
    rows.append(row(f"{args.qformat} ({model.ptq_config.algorithm}, group {model.ptq_config.group_size})",
                    ppl(model, "quantized"), baseline, seconds=calib_seconds))
    with tempfile.TemporaryDirectory() as output_dir:
        peft_model, losses, seconds = train_lora(model, train_windows, args, Path(output_dir) / "quantized")
        rows.append(row(f"{args.qformat} + LoRA r={args.rank}", ppl(peft_model, "quantized + LoRA"), baseline,
                        losses, seconds))
        with torch.no_grad():
            merged = peft_model.merge_and_unload()
        rows.append(row(f"{args.qformat} + LoRA merged into the grid", ppl(merged, "merged"), baseline))
        if not args.no_control:
            control, losses, seconds = train_lora(unquantized, train_windows, args, Path(output_dir) / "control")
            rows.append(row(f"unquantized + LoRA r={args.rank} (control)", ppl(control, "control"), baseline,
                            losses, seconds))
    print(f"protocol: {args.qformat} calibrated on {args.calib_samples} x {args.seq_len} tokens; LoRA r={args.rank} "
          f"on {', '.join(TARGETS)}, {args.train_steps} steps x {args.train_batch_size} x {args.train_seq_len} tokens "
          f"of the five other Austen novels, lr {args.learning_rate} (constant); perplexity on the first "
          f"{args.eval_windows} x {args.seq_len} tokens of Pride and Prejudice; {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print_table(["model", "perplexity", "ratio to unquantized", "training loss first -> last", "seconds"], rows,
                args.markdown, width=24)


if __name__ == "__main__":
    main()
