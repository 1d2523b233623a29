"""Perplexity of one checkpoint, in its own interpreter: `served_export_ppl.py` runs it.

    python benchmarks/checkpoint_perplexity.py <checkpoint> <eval windows .pt> <batch size> [--plugin]

Without --plugin, only transformers (and, for a compressed-tensors checkpoint, the
compressed-tensors package) load the model: what a user who does not have hf_ptq_plugin sees.
Prints one JSON line: ppl, the quantizer transformers chose, the dtype, whether the plugin was imported.
"""

import json
import math
import sys

import torch
import torch.nn.functional as F_nn
from transformers import AutoModelForCausalLM


def windows_perplexity(model, windows: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token NLL) over every predicted position; the same sum as hf_ptq_plugin.evaluation."""
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            total_nll += F_nn.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="sum").item()
            total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def main(argv) -> None:
    checkpoint, eval_path, batch_size = argv[0], argv[1], int(argv[2])
    if "--plugin" in argv:
        import hf_ptq_plugin  # noqa: F401  registers the "modelopt" quantizer with transformers
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ppl = windows_perplexity(model, torch.load(eval_path), batch_size)
    print(json.dumps({"ppl": ppl, "quantizer": type(model.hf_quantizer).__name__, "dtype": str(model.dtype),
                      "plugin_imported": "hf_ptq_plugin" in sys.modules}))


if __name__ == "__main__":
    main(sys.argv[1:])
