"""QuantExperts: the module swapped in for a transformers-5 fused-experts module (see fused_experts.py).

It holds, for every expert e, three QuantLinears as children `{e}.{gate}`, `{e}.{up}`,
`{e}.{down}`, named as the family's checkpoints name them, so the model's state_dict gives the
per-expert tensors of a unified checkpoint with the names, dtypes and shapes of
`docs/modelopt-facts.md` §6.4, e.g. for Qwen3-MoE NVFP4 (H hidden, I expert intermediate):

    model.layers.L.mlp.experts.{e}.gate_proj.{weight uint8 [I, H/2], weight_scale f8 [I, H/16],
                                              weight_scale_2 f32 [], input_scale f32 []}
    model.layers.L.mlp.experts.{e}.up_proj.{...}    model.layers.L.mlp.experts.{e}.down_proj.{... [H, I/2] ...}

and for Mixtral `model.layers.L.block_sparse_moe.experts.{e}.w1 / w3 / w2.*` (transformers renames
`.mlp.` back to `.block_sparse_moe.` on save). Where these names come from (read, not run):
- ModelOpt HEAD's HF export splits fused experts into `{E}.gate_proj/up_proj/down_proj` modules
  under the experts module, each with weight, weight_scale, weight_scale_2, input_scale
  (`modelopt/torch/export/moe_utils.py::_export_fused_experts`), then calls `save_pretrained`.
- vLLM maps the prefix `experts.{e}.{ckpt_name}.` of every tensor (weight and all scales) onto
  its fused `experts.w13_*` / `experts.w2_*` (`FusedMoE.make_expert_params_mapping`); Qwen-MoE
  loaders pass gate_proj/up_proj/down_proj, the Mixtral family (Mixtral, MiniMax) w1/w3/w2.
- The projection names are read off transformers' conversion mapping (experts.projection_names):
  Mixtral's maps `.experts.*.w1.weight` + `.experts.*.w3.weight` -> `gate_up_proj`, `w2` ->
  `down_proj`; Qwen2/3-MoE, OLMoE use gate_proj/up_proj/down_proj. For Mixtral this follows the
  original checkpoints and vLLM's loader rather than ModelOpt HEAD's split, which always writes
  gate_proj/up_proj/down_proj (a Mixtral split that way would be saved as
  `block_sparse_moe.experts.{e}.gate_proj`, a name vLLM's Mixtral loader does not map).

Scales shared as ModelOpt HEAD shares them: one input scale per projection per layer (every
expert's gate and up hold the same `input_scale`, every down another one); an expert's gate and
up are quantized as one (2I, H) tensor and split, so they share `weight_scale_2` (NVFP4, W4A8;
engines run them as one w13 GEMM) and the per-tensor FP8 `weight_scale`. The forward is the eager
experts forward (experts.route_tokens) with each projection a QuantLinear: dequantize + F.linear
per routed expert, the same routing as the replaced module.
"""

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import formats as F
from ..numerics import quantize_weight
from ..numerics.scales import abs_amax
from .fused_experts import FUSED_PARAMS, route_tokens
from .layer_plan import LayerPlan
from .quant_linear import QuantLinear


class SharedInput:
    """Tag on the QuantLinears that share one input scale (`calibration.stats.pool_shared_inputs` pools them)."""

    def __init__(self, kind: str):
        self.kind = kind  # "gate_up" or "down"


class ExpertMLP(nn.Module):
    """One expert: its gate, up and down QuantLinears under the checkpoint's projection names."""

    def __init__(self, names: Sequence[str]):
        super().__init__()
        self.names = tuple(names)  # (gate, up, down)

    def forward(self, x: torch.Tensor, act_fn) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(act_fn(gate(x)) * up(x))


class QuantExperts(nn.Module):
    """Quantized experts of one MoE layer; see the module docstring."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module,
                 fmt: F.Format, group_size: Optional[int], names: Sequence[str],
                 dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.fmt, self.group_size, self.names = fmt, group_size, tuple(names)
        self.act_fn = act_fn
        shared = {"gate_up": SharedInput("gate_up"), "down": SharedInput("down")}
        shapes = ((intermediate_dim, hidden_dim, "gate_up"),) * 2 + ((hidden_dim, intermediate_dim, "down"),)
        for e in range(num_experts):
            expert = ExpertMLP(self.names)
            for name, (out_features, in_features, kind) in zip(self.names, shapes):
                linear = QuantLinear(in_features, out_features, False, fmt, group_size, dtype=dtype, device=device)
                linear.shared_input = shared[kind]
                setattr(expert, name, linear)
            self.add_module(str(e), expert)

    @classmethod
    def like(cls, fused: nn.Module, fmt: F.Format, group_size: Optional[int], names: Sequence[str],
             device=None) -> "QuantExperts":
        """An empty QuantExperts shaped like the fused module `fused` (on `device`, default: its own)."""
        experts, two_i, hidden = fused.gate_up_proj.shape
        return cls(experts, hidden, two_i // 2, fused.act_fn, fmt, group_size, names,
                   dtype=fused.gate_up_proj.dtype, device=device or fused.gate_up_proj.device)

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def projections(self, kind: str) -> List[QuantLinear]:
        """Every expert's QuantLinears of `kind`: "gate_up" (gate and up) or "down"."""
        names = self.names[:2] if kind == "gate_up" else self.names[2:]
        return [getattr(self.expert(e), name) for e in range(self.num_experts) for name in names]

    @torch.no_grad()
    def quantize_fused(self, param: str, w: torch.Tensor, chosen: Optional[Dict[int, LayerPlan]] = None
                       ) -> Dict[str, torch.Tensor]:
        """{"{e}.{proj}.{buffer}": tensor} quantizing fused weights `w` (E, 2I, H) or (E, H, I).

        `chosen` {e: LayerPlan} gives experts whose weights an algorithm picked: `weight` (values on
        the format's grid, GPTQ; the per-tensor second-level scale still comes from `w[e]`'s amax),
        `weight_scale` or `weight_global_amax` (clipping, MSE). The other experts are rounded to nearest.
        """
        if param not in FUSED_PARAMS:
            raise ValueError(f"unknown fused experts parameter {param!r}; valid: {', '.join(FUSED_PARAMS)}")
        out, chosen = {}, chosen or {}
        for e in range(self.num_experts):
            plan = chosen.get(e, LayerPlan())
            global_amax = plan.weight_global_amax
            if plan.weight is not None and global_amax is None:
                global_amax = abs_amax(w[e].detach())
            weight = w[e] if plan.weight is None else plan.weight
            tensors = quantize_weight(weight, self.fmt, self.group_size, global_amax, plan.weight_scale)
            if param == "down_proj":
                out.update({f"{e}.{self.names[2]}.{k}": t for k, t in tensors.items()})
                continue
            for half, name in enumerate(self.names[:2]):  # gate rows first, then up
                out.update({f"{e}.{name}.{k}": _row_half(t, half, w.shape[1]) for k, t in tensors.items()})
        return out

    @torch.no_grad()
    def load_fused(self, param: str, w: torch.Tensor, chosen: Optional[Dict[int, LayerPlan]] = None) -> None:
        """Quantize fused weights `w` into this module's buffers (`chosen`: see quantize_fused)."""
        for key, tensor in self.quantize_fused(param, w, chosen).items():
            self.get_buffer(key).copy_(tensor)

    def set_input_amax(self, kind: str, amax: torch.Tensor) -> None:
        """One static input scale for every expert's `kind` ("gate_up" or "down") projections."""
        for linear in self.projections(kind):
            linear.set_input_amax(amax)

    def set_pre_quant_scale(self, kind: str, pre_quant_scale: torch.Tensor) -> None:
        """One `pre_quant_scale` (K,) for every expert's `kind` projections (AWQ, SmoothQuant:
        calibration/expert_smoothing.py)."""
        for linear in self.projections(kind):
            linear.pre_quant_scale = pre_quant_scale.to(device=linear.weight.device, dtype=linear.dtype, copy=True)

    def add_fused_placeholders(self) -> None:
        """Meta `gate_up_proj` / `down_proj` parameters, so the loader merges per-expert source
        tensors into them and hands each merged tensor to the quantize op (hf/quantize_on_load.py)."""
        shapes = {"gate_up_proj": (2 * self.intermediate_dim, self.hidden_dim),
                  "down_proj": (self.hidden_dim, self.intermediate_dim)}
        dtype = self.projections("down")[0].dtype
        self.consumed_placeholders = set()  # filled by the quantize op (hf/quantize_on_load.py)
        for name, shape in shapes.items():
            placeholder = torch.empty((self.num_experts, *shape), dtype=dtype, device="meta")
            self.register_parameter(name, nn.Parameter(placeholder, requires_grad=False))

    def drop_fused_placeholders(self) -> None:
        for name in FUSED_PARAMS:
            self._parameters.pop(name, None)
        vars(self).pop("consumed_placeholders", None)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return route_tokens(hidden_states, top_k_index, top_k_weights, self.num_experts,
                            lambda e, x, token_idx: self.expert(e)(x, self.act_fn))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, intermediate_dim="
                f"{self.intermediate_dim}, format={self.fmt.name}, names={self.names}")


def _row_half(t: torch.Tensor, half: int, rows: int) -> torch.Tensor:
    """The gate (half 0) or up (half 1) part of a tensor quantized from `rows` fused rows.

    Per-tensor scales (0-d) are shared; others hold a whole number of tensor rows per weight row
    (INT4 packs 2 rows per byte row, FP8 tiles 128 rows per scale row).
    """
    if t.dim() == 0:
        return t.clone()
    n = t.shape[0] * (rows // 2) // rows
    return t[half * n:(half + 1) * n].clone()
