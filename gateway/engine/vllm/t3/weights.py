"""Which tensor of upstream ``t3_cfg.safetensors`` goes where in the vLLM model.

The mapping is plain data so it is tested without vLLM: every parameter of the vLLM model
is covered, and every checkpoint tensor is either loaded or deliberately left to the CPU
side (conditioning encoder, text positions) or unused at inference (text head, the
backbone's 8-row token embedding that T3 never uses).
"""

from __future__ import annotations

from dataclasses import dataclass

# checkpoint name prefix -> reason it is not loaded into the vLLM model
SKIPPED_PREFIXES: dict[str, str] = {
    "cond_enc.": "conditioning encoder runs on the CPU side (prompt.py)",
    "text_pos_emb.": "text positions are added on the CPU side (prompt.py)",
    "text_head.": "text logits are a training-only output",
    "tfmr.embed_tokens.": "T3 feeds embeddings, never backbone token ids",
    "tfmr.rotary_emb.": "RoPE tables are recomputed by vLLM",
}

_STACKED = (
    # (checkpoint part, vLLM fused parameter part, shard id)
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", "q"),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k"),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v"),
    (".mlp.gate_proj.", ".mlp.gate_up_proj.", 0),
    (".mlp.up_proj.", ".mlp.gate_up_proj.", 1),
)

_RENAMED = {
    "text_emb.weight": "model.text_emb.weight",
    "speech_emb.weight": "model.speech_emb.weight",
    "speech_pos_emb.emb.weight": "model.speech_pos_emb.weight",
    "speech_head.weight": "speech_head.weight",
}


@dataclass(frozen=True, slots=True)
class Target:
    param: str
    shard: str | int | None = None


def map_name(name: str) -> Target | None:
    """Where checkpoint tensor ``name`` goes, or None when it is not loaded (see
    :data:`SKIPPED_PREFIXES`). Unknown names raise: a silently ignored tensor is a bug."""
    for prefix in SKIPPED_PREFIXES:
        if name.startswith(prefix):
            return None
    if name in _RENAMED:
        return Target(_RENAMED[name])
    if name.startswith("tfmr."):
        inner = "model." + name[len("tfmr."):]
        for part, fused, shard in _STACKED:
            if part in inner:
                return Target(inner.replace(part, fused), shard)
        return Target(inner)
    raise KeyError(f"unexpected tensor in t3_cfg.safetensors: {name}")


def expected_params(num_layers: int) -> set[str]:
    """The vLLM model's parameter names (checked against the real model on the GPU)."""
    names = {"model.norm.weight", "model.text_emb.weight", "model.speech_emb.weight",
             "model.speech_pos_emb.weight", "speech_head.weight"}
    for i in range(num_layers):
        base = f"model.layers.{i}."
        names |= {base + s for s in ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                                     "mlp.gate_up_proj.weight", "mlp.down_proj.weight",
                                     "input_layernorm.weight", "post_attention_layernorm.weight")}
    return names
