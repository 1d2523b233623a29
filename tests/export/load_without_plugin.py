"""Load checkpoints with transformers alone, as a user without hf_ptq_plugin would, and record what they compute.

Run in a fresh interpreter: `python load_without_plugin.py <token ids .pt> <checkpoint> <record .pt> ...`
(any number of checkpoint/record pairs). Each record holds the logits for the token ids, every
Linear's first input and output in that forward, the quantizer transformers chose, the dtype it
loaded in, and whether hf_ptq_plugin was imported (it must not be: the point is to run without it).
"""

import sys

import torch
from transformers import AutoModelForCausalLM


def record(checkpoint: str, token_ids: torch.Tensor) -> dict:
    """Logits and each nn.Linear's (input, output) of one forward of the checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    linears = {}

    def keep(name):
        def hook(module, args, output):
            linears.setdefault(name, (args[0].detach().clone(), output.detach().clone()))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(keep(name))
    with torch.no_grad():
        logits = model(token_ids).logits
    return {"logits": logits, "linears": linears, "quantizer": type(model.hf_quantizer).__name__,
            "dtype": model.dtype, "plugin_imported": "hf_ptq_plugin" in sys.modules}


def main(argv) -> None:
    token_ids = torch.load(argv[0])
    for checkpoint, out in zip(argv[1::2], argv[2::2]):
        torch.save(record(checkpoint, token_ids), out)


if __name__ == "__main__":
    main(sys.argv[1:])
