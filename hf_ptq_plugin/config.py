"""PTQConfig: what to quantize and how, as JSON-primitive fields validated at construction.

Errors name the bad value and list the valid choices. `to_dict` / `from_dict` round-trip
exactly. It is also transformers' `QuantizationConfigMixin` for quant_method "modelopt", so
`from_pretrained(..., quantization_config=PTQConfig(...))` accepts it and `from_dict` also reads
the `quantization_config` that ModelOpt (and our exporter) write into config.json.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from transformers.utils.quantization_config import QuantizationConfigMixin

from . import formats as F
from .calibration.algorithms import ALGORITHMS, algorithms_for

PRE_QUANT_SCALES = ("fold", "keep")  # PTQConfig.pre_quant_scales


@dataclass
class PTQConfig(QuantizationConfigMixin):
    """Post-training quantization settings; names follow ModelOpt's `hf_ptq.py` flags.

    qformat: weight/activation format (`formats.FORMATS`). kv_cache_qformat: "none", "fp8" or
    "nvfp4". algorithm: calibration algorithm, None = the format's default. group_size: None =
    the format's default (for INT4: 128, or the largest engine-supported size that divides every
    layer). exclude_modules: module names or fnmatch patterns kept in full precision, in addition
    to the defaults (lm_head, MoE routers, vision towers). calib_*: calibration data and sizes.
    sequential: the layer-streamed algorithms (SmoothQuant, AWQ, GPTQ) calibrate each decoder
    block on the outputs of the blocks before it as quantized (True), or on their full-precision
    outputs (False, ModelOpt's way for AWQ and SmoothQuant: one pass per block instead of two);
    None = the format's default (`resolved_sequential`).
    pre_quant_scales: where the per-channel smoothing scales of AWQ and SmoothQuant go. "fold"
    (default): into the layer before, so no Linear keeps a `pre_quant_scale` and every export
    target can write the model: the norms for q/k/v and gate/up, v_proj's rows for o_proj (under
    grouped-query attention the scale is shared by the query heads of each KV group, so it can),
    up_proj's rows for down_proj. "keep": ModelOpt's layout, o_proj and down_proj (and every
    SmoothQuant layer) keep a per-channel `pre_quant_scale`, which only the unified checkpoint
    (TensorRT-LLM) applies.
    layer_qformats: {Linear name: qformat} of a per-layer (ModelOpt MIXED_PRECISION) checkpoint:
    exactly these Linears are quantized, each in its own format (`qformat` then names the most
    common one); it comes from loading such a checkpoint, and quantize() and quantizing while
    loading take one qformat.
    """

    qformat: str = "fp8"
    kv_cache_qformat: str = "none"
    algorithm: Optional[str] = None
    group_size: Optional[int] = None
    exclude_modules: List[str] = field(default_factory=list)
    calib_dataset: Optional[str] = None
    calib_size: int = 512
    calib_seq_len: int = 512
    calib_batch_size: int = 4
    sequential: Optional[bool] = None
    pre_quant_scales: str = "fold"
    layer_qformats: Optional[Dict[str, str]] = None

    # transformers' registry key (the mixin declares it as a dataclass field); fixed, not an argument.
    quant_method: str = field(default="modelopt", init=False, repr=False, compare=False)

    def __post_init__(self):
        self._check_strings()
        if self.pre_quant_scales not in PRE_QUANT_SCALES:
            raise ValueError(f"unknown pre_quant_scales {self.pre_quant_scales!r}; "
                             f"valid: {', '.join(PRE_QUANT_SCALES)}")
        fmt = F.get_format(self.qformat)
        F.get_kv_format(self.kv_cache_qformat)
        self._check_layer_qformats()
        self._check_algorithm(fmt)
        self._check_group_size(self._grouped_format() or fmt)
        if not isinstance(self.exclude_modules, (list, tuple)) or not all(
                isinstance(m, str) for m in self.exclude_modules):
            raise ValueError(f"exclude_modules must be a list of module names or patterns, "
                             f"got {self.exclude_modules!r}")
        self.exclude_modules = list(self.exclude_modules)
        if self.sequential is not None and not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True, False or None (the format's default), got {self.sequential!r}")
        for name in ("calib_size", "calib_seq_len", "calib_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def _check_strings(self) -> None:
        """Names and the calibration data source are strings (config.json holds them); a list of formats is
        AutoQuantize's (`hf_ptq_plugin.auto_quantize`)."""
        named = {"qformat": F.FORMATS, "kv_cache_qformat": F.KV_FORMAT_NAMES, "algorithm": ALGORITHMS,
                 "pre_quant_scales": PRE_QUANT_SCALES}
        for name, valid in named.items():
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "algorithm" and value is None):
                hint = "; several formats per layer: hf_ptq_plugin.auto_quantize" if name == "qformat" else ""
                raise ValueError(f"{name} must be one name, got {value!r}; valid: {', '.join(valid)}{hint}")
        if self.calib_dataset is not None and not isinstance(self.calib_dataset, str):
            raise ValueError(f"calib_dataset must be a file, folder or Hub dataset name (a string), got "
                             f"{type(self.calib_dataset).__name__}; for data in memory use "
                             "hf_ptq_plugin.calibrate(model, data) after loading")

    def _check_layer_qformats(self) -> None:
        if self.layer_qformats is None:
            return
        if not isinstance(self.layer_qformats, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.layer_qformats.items()):
            raise ValueError(f"layer_qformats must map Linear names to qformat names, got {self.layer_qformats!r}")
        for qformat in self.layer_qformats.values():
            F.get_format(qformat)

    def _grouped_format(self) -> Optional[F.Format]:
        """With per-layer formats, the one whose group size `group_size` sets (INT4), if any."""
        formats = [F.get_format(q) for q in (self.layer_qformats or {}).values()]
        return next((fmt for fmt in formats if fmt.group_size_choices), None)

    def _check_algorithm(self, fmt: F.Format) -> None:
        if self.algorithm is None:
            return
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; valid: {', '.join(ALGORITHMS)} "
                             "(or None for the format's default)")
        if not ALGORITHMS[self.algorithm].fits(fmt):
            raise ValueError(f"algorithm {self.algorithm!r} does not fit qformat {fmt.name!r}; "
                             f"valid for it: {', '.join(algorithms_for(fmt))}")

    def _check_group_size(self, fmt: F.Format) -> None:
        if self.group_size is None:
            return
        valid = fmt.group_size_choices or ((fmt.group_size,) if fmt.group_size else ())
        if self.group_size not in valid:
            choices = ", ".join(map(str, valid)) if valid else "none (leave group_size=None)"
            raise ValueError(f"group_size={self.group_size!r} is not valid for qformat {fmt.name!r}; valid: {choices}")

    @property
    def format(self) -> F.Format:
        return F.get_format(self.qformat)

    @property
    def kv_format(self) -> Optional[F.KVFormat]:
        return F.get_kv_format(self.kv_cache_qformat)

    @property
    def resolved_algorithm(self) -> str:
        return self.algorithm or self.format.default_algorithm

    @property
    def resolved_sequential(self) -> bool:
        return self.format.default_sequential if self.sequential is None else self.sequential

    @property
    def needs_calibration_data(self) -> bool:
        """Static activation scales, a quantized KV cache, or an algorithm that reads activations."""
        return (self.format.needs_calibration_data or self.kv_format is not None
                or ALGORITHMS[self.resolved_algorithm].streamed)

    @property
    def cannot_run_without_data(self) -> bool:
        """`needs_calibration_data`, except a default algorithm alone: without data that one gives way to
        round to nearest (`max`), as `quantize()` and loading do."""
        return self.needs_calibration_data and (self.algorithm is not None or self.format.needs_calibration_data
                                                or self.kv_format is not None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, return_unused_kwargs: bool = False, **kwargs):
        """Build from our own dict, or from a checkpoint's `quantization_config` (ours or ModelOpt's).

        `return_unused_kwargs` / `kwargs` follow transformers' `QuantizationConfigMixin.from_dict`.
        """
        from .export.quant_config import ptq_fields_from_checkpoint_config

        values = dict(values)
        method = values.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise ValueError(f"quant_method {method!r} is not PTQConfig's; valid: {cls.quant_method!r}")
        values = ptq_fields_from_checkpoint_config(values)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PTQConfig field(s) {unknown}; valid: {', '.join(sorted(known))}")
        config = cls(**values)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config
