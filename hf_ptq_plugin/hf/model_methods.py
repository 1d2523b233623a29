"""transformers methods of a quantized model that would misreport it, replaced on the model itself.

- `push_to_hub`: transformers' own saves the checkpoint, then overwrites our model card with an
  empty one of its own; ours (`export.hub.push_to_hub`) commits the unified checkpoint with our card.
- `num_parameters`: transformers counts `nn.Parameter`s, and a QuantLinear's weight is a buffer of
  codes, so SmolLM2-135M would count 28 M; ours counts each quantized weight as the
  in_features x out_features parameters it stands for (frozen: not in `only_trainable`).
- `get_memory_footprint`: also counts the CPU compute forms of the weights (footprint.py).

Each is a small class bound to one model (not a bound function) so the model still pickles and deep-copies.
"""

from typing import Optional

from torch import nn

from ..export.hub import push_to_hub
from ..modules.quant_linear import QuantLinear
from .footprint import MemoryFootprint


class HubPush:
    """The model's `push_to_hub`, with transformers' keywords, through `export.hub.push_to_hub`."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, repo_id: str, *, commit_message: Optional[str] = None, private: Optional[bool] = None,
                 token=None, revision: Optional[str] = None, create_pr: bool = False, max_shard_size="50GB",
                 **kwargs):
        kwargs.pop("commit_description", None)  # transformers' keyword: one message is all our commit carries
        kwargs.pop("tags", None)  # the card's tags come from the quantization
        return push_to_hub(self.model, repo_id, private=private, token=token, commit_message=commit_message,
                           revision=revision, create_pr=create_pr, max_shard_size=max_shard_size, **kwargs)


class ParameterCount:
    """The model's `num_parameters`: transformers' count plus the weights QuantLinears hold as codes."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        counted = type(self.model).num_parameters(self.model, only_trainable=only_trainable,
                                                  exclude_embeddings=exclude_embeddings)
        if only_trainable:
            return counted  # quantized weights are frozen
        return counted + sum(m.in_features * m.out_features for m in self.model.modules()
                             if isinstance(m, QuantLinear))


def install_model_methods(model: nn.Module) -> None:
    for name, method in (("push_to_hub", HubPush), ("num_parameters", ParameterCount),
                         ("get_memory_footprint", MemoryFootprint)):
        if hasattr(model, name) and not isinstance(vars(model).get(name), method):
            setattr(model, name, method(model))
