"""The synthetic Llama-3-8B family of `scale.py`: random bf16 weights with outlier channels, written once.

`llama3_shape` gives LlamaConfig fields at any size of the family; `make_checkpoint` writes one shard
per decoder layer (plus embeddings and norm + lm_head), each tensor from a generator seeded by its
name, so a smaller model's first layers are the 8B model's.
"""

import json
import shutil
import tempfile
import zlib
from pathlib import Path

LLAMA3_8B = dict(hidden=4096, intermediate=14336, layers=32, vocab=128256)
OUTLIERS = 8  # hidden channels with ~20x larger activations (norm weights), and 8 with 8x larger weight columns


def llama3_shape(layers: int, hidden: int, intermediate=None, vocab: int = LLAMA3_8B["vocab"]) -> dict:
    """LlamaConfig fields of Llama-3-8B's family at another size: head_dim 128 (less below hidden 1024),
    4 query heads per KV head."""
    head_dim = min(128, hidden // 8)
    heads = hidden // head_dim
    intermediate = intermediate or round(hidden * 3.5 / 128) * 128
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=head_dim,
                vocab_size=vocab, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                tie_word_embeddings=False)


def shard_tensors(shape: dict):
    """[[(name, tensor shape, kind)] per shard]: embeddings, one shard per decoder layer, norm + lm_head."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    block = [("input_layernorm", (h,), "norm"), ("self_attn.q_proj", (q, h), "matrix"),
             ("self_attn.k_proj", (kv, h), "matrix"), ("self_attn.v_proj", (kv, h), "producer"),
             ("self_attn.o_proj", (h, q), "matrix"), ("post_attention_layernorm", (h,), "norm"),
             ("mlp.gate_proj", (i, h), "matrix"), ("mlp.up_proj", (i, h), "producer"),
             ("mlp.down_proj", (h, i), "matrix")]
    shards = [[("model.embed_tokens.weight", (v, h), "matrix")]]
    shards += [[(f"model.layers.{layer}.{name}.weight", dims, kind) for name, dims, kind in block]
               for layer in range(shape["num_hidden_layers"])]
    shards.append([("model.norm.weight", (h,), "final_norm"), ("lm_head.weight", (v, h), "matrix")])
    return shards


def make_tensor(name: str, shape, kind: str, seed: int):
    """One bf16 tensor, from a generator seeded by its name (so a 2-layer model's layers are the 8B's first
    two), made in row blocks so the fp32 temporaries stay small. Outliers: the norms give OUTLIERS hidden
    channels ~20x larger activations (the same channels in every layer, as in trained LLMs); v_proj and
    up_proj give a few of o_proj's and down_proj's input channels 8x larger ones; every matrix has
    OUTLIERS input columns 8x larger weights."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    channels = torch.randperm(shape[-1], generator=torch.Generator().manual_seed(seed))[:2 * OUTLIERS]
    if kind in ("norm", "final_norm"):
        w = torch.ones(shape, dtype=torch.bfloat16)
        if kind == "norm":
            w[channels[:OUTLIERS]] = 20.0
        return w
    w = torch.empty(shape, dtype=torch.bfloat16)
    for start in range(0, shape[0], 4096):
        block = torch.randn((min(4096, shape[0] - start), shape[1]), generator=generator).mul_(0.02)
        block[:, channels[OUTLIERS:]] *= 8.0
        w[start:start + block.shape[0]] = block
    if kind == "producer":
        w[torch.randperm(shape[0], generator=generator)[:OUTLIERS]] *= 8.0
    return w


def make_checkpoint(work_dir: Path, shape: dict, tokenizer_dir: Path, seed: int) -> Path:
    """The checkpoint's folder, written once (atomically: a staging folder renamed when complete)."""
    name = (f"llama3-synthetic-{shape['num_hidden_layers']}l-{shape['hidden_size']}h-"
            f"{shape['intermediate_size']}i-{shape['vocab_size']}v-seed{seed}")
    path = work_dir / name
    if (path / "config.json").exists():
        return path
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=work_dir, prefix=f".{name}-"))
    try:
        shards, weight_map, total = shard_tensors(shape), {}, 0
        for index, tensors in enumerate(shards):
            file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            state = {key: make_tensor(key, dims, kind, seed) for key, dims, kind in tensors}
            save_file(state, staging / file, metadata={"format": "pt"})
            weight_map.update({key: file for key in state})
            total += sum(t.numel() * t.element_size() for t in state.values())
            del state
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.save_pretrained(staging)
        config = LlamaConfig(**shape, dtype="bfloat16", architectures=["LlamaForCausalLM"],
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        config.save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp's 0700 otherwise
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
