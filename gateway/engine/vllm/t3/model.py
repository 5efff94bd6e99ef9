"""Chatterbox T3 as a vLLM 0.24 model, with classifier-free guidance inside one sequence.

Each request is one vLLM sequence whose backbone runs two streams side by side: the
conditional stream and the unconditional one (same prefix, text embeddings zeroed, text
positions kept). Dense layers (norms, projections, MLP) see the two streams as a batch of
``2N`` rows of width 1024; attention sees one sequence of 32 heads (0-15 conditional,
16-31 unconditional, never mixing), so vLLM's paged KV cache, scheduler and CUDA graphs
account for both streams. The guided hidden state ``(1 + w) h_c - w h_u`` is mixed in fp32
per row; the bias-free speech head then gives exactly upstream's
``cond + w (cond - uncond)`` logits.

The head runs outside vLLM's CUDA graph (``compute_logits`` is called eagerly every step), so
it is kept to one kernel: its weight is an fp32 parameter (loaded from the checkpoint's fp32
values; no cast of 8194 x 1024 weights per step) and the ids that can never be produced get
their ``-inf`` from a bias row in the same ``addmm``.

Per-request numbers (prompt length, CFG weight, text ids) reach ``forward`` through the
M-RoPE position side channel described in ``layout``: no Python state per request, no
``.item()``, nothing that breaks graph capture.

Imported only by vLLM (through the plugin's lazy registration), never by the gateway.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsMRoPE
from vllm.sequence import IntermediateTensors

from gateway.engine.vllm.t3.layout import (
    IdLayout,
    decode_positions,
    head_logits,
    mrope_positions,
    speech_logit_mask,
)
from gateway.engine.vllm.t3.weights import map_name


class T3Attention(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, max_position: int, prefix: str) -> None:
        super().__init__()
        self.width = config.hidden_size
        heads, head_dim = config.t3_num_heads, config.head_dim  # T3's; attention runs 2x
        if config.num_attention_heads != 2 * heads or config.num_key_value_heads != 2 * heads:
            raise ValueError("config must declare the 2 x t3_num_heads heads the kernels run")
        self.qkv_proj = QKVParallelLinear(self.width, head_dim, heads, heads, bias=False, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * head_dim, self.width, bias=False, prefix=f"{prefix}.o_proj")
        rope = {k: v for k, v in config.rope_parameters.items() if k != "mrope_section"}
        self.rotary_emb = get_rope(head_dim, max_position=max_position, rope_parameters=rope, is_neox_style=True)
        # Both streams are heads of one sequence: twice T3's heads, its head size.
        self.attn = Attention(2 * heads, head_dim, head_dim ** -0.5, num_kv_heads=2 * heads,
                              cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # h: [2N, width], rows (token 0 cond, token 0 uncond, token 1 cond, ...)
        qkv, _ = self.qkv_proj(h)
        n = qkv.shape[0] // 2
        qkv = qkv.view(n, 2, 3, self.width)
        q = qkv[:, :, 0].reshape(n, 2 * self.width)
        k = qkv[:, :, 1].reshape(n, 2 * self.width)
        v = qkv[:, :, 2].reshape(n, 2 * self.width)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v).reshape(2 * n, self.width))
        return out


class T3MLP(nn.Module):
    def __init__(self, config, prefix: str) -> None:
        super().__init__()
        width, ffn = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(width, [ffn, ffn], bias=False, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(ffn, width, bias=False, prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(h)
        out, _ = self.down_proj(self.act(gate_up))
        return out


class T3DecoderLayer(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, max_position: int, prefix: str) -> None:
        super().__init__()
        self.self_attn = T3Attention(config, vllm_config, max_position, f"{prefix}.self_attn")
        self.mlp = T3MLP(config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class T3Backbone(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.width = config.hidden_size
        self.max_position = min(vllm_config.model_config.max_model_len, config.max_position_embeddings)
        self.text_vocab = config.t3_text_vocab_size
        self.speech_positions = config.t3_speech_positions
        self.layers = nn.ModuleList(
            T3DecoderLayer(config, vllm_config, self.max_position, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(self.width, eps=config.rms_norm_eps)
        self.speech_emb = nn.Embedding(getattr(config, "t3_speech_vocab_size", config.vocab_size), self.width)
        self.speech_pos_emb = nn.Embedding(self.speech_positions, self.width)
        self.text_emb = nn.Embedding(self.text_vocab, self.width)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Generated speech tokens; their learned position is added in forward.
        return self.speech_emb(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        rows = decode_positions(positions, max_position=self.max_position,
                                speech_positions=self.speech_positions, text_vocab=self.text_vocab)
        zero = x.new_zeros(())
        x = x + torch.where(rows.is_generated[:, None], self.speech_pos_emb(rows.speech_index), zero)
        text = torch.where(rows.is_text[:, None], self.text_emb(rows.text_token), zero)
        n = x.shape[0]
        h = torch.stack((x + text, x), dim=1).view(2 * n, self.width)
        residual = None
        for layer in self.layers:
            h, residual = layer(rows.position, h, residual)
        h, _ = self.norm(h, residual)
        h = h.view(n, 2, self.width).float()
        w = rows.cfg_weight[:, None]
        return (1.0 + w) * h[:, 0] - w * h[:, 1]


class ChatterboxT3ForCausalLM(nn.Module, SupportsMRoPE):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = T3Backbone(vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        speech_vocab = getattr(config, "t3_speech_vocab_size", config.vocab_size)
        # fp32 whatever the served dtype: upstream's head runs in fp32 on fp32 weights.
        self.speech_head = nn.Linear(config.hidden_size, speech_vocab, bias=False, dtype=torch.float32)
        self.id_layout = IdLayout(config.t3_text_vocab_size)
        # Not a state-dict entry: vLLM's dummy loader would fill it with random values.
        self.register_buffer("logit_mask", speech_logit_mask(speech_vocab), persistent=False)

    def embed_input_ids(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: guided fp32 rows; head and mask in one fp32 kernel (module docstring).
        logits = head_logits(hidden_states, self.speech_head.weight, self.logit_mask)
        if logits.shape[-1] < self.config.vocab_size:  # wide id layout (Multilingual): masked columns
            logits = F.pad(logits, (0, self.config.vocab_size - logits.shape[-1]), value=float("-inf"))
        return logits

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        return mrope_positions(list(input_tokens), self.id_layout)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = map_name(name)
            if target is None:
                continue
            param = params[target.param]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if target.shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, target.shard)
            loaded.add(target.param)
        return loaded
