"""Chatterbox Turbo's T3 as a vLLM 0.24 model: GPT-2 medium over prompt embeddings, no CFG.

Rows arrive as prompt embeddings (``turbo.TurboPromptBuilder``); generated tokens are
embedded by ``speech_emb``. Every row gets GPT-2's absolute position embedding
``wpe(position)`` added, as HF ``GPT2Model`` does for ``inputs_embeds``. The speech head has
a bias (upstream: ``bias=is_gpt``); logits are the 6563 speech ids, the start-of-speech id
masked. Layers use the same vLLM building blocks as the original's plugin (``model.py``).

Imported only by vLLM (through the plugin's lazy registration), never by the gateway.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from gateway.engine.vllm.t3.turbo import START_SPEECH, map_turbo_name


class TurboAttention(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        width, heads = config.hidden_size, config.num_attention_heads
        head_dim = width // heads
        self.c_attn = QKVParallelLinear(width, head_dim, heads, bias=True, prefix=f"{prefix}.c_attn")
        self.c_proj = RowParallelLinear(width, width, bias=True, prefix=f"{prefix}.c_proj")
        self.attn = Attention(heads, head_dim, head_dim ** -0.5, cache_config=vllm_config.cache_config,
                              prefix=f"{prefix}.attn")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(h)
        q, k, v = qkv.chunk(chunks=3, dim=-1)
        out, _ = self.c_proj(self.attn(q, k, v))
        return out


class TurboBlock(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        width = config.hidden_size
        inner = config.n_inner or 4 * width
        self.ln_1 = nn.LayerNorm(width, eps=config.layer_norm_epsilon)
        self.attn = TurboAttention(config, vllm_config, f"{prefix}.attn")
        self.ln_2 = nn.LayerNorm(width, eps=config.layer_norm_epsilon)
        self.c_fc = ColumnParallelLinear(width, inner, bias=True, prefix=f"{prefix}.mlp.c_fc")
        self.c_proj = RowParallelLinear(inner, width, bias=True, prefix=f"{prefix}.mlp.c_proj")
        self.act = get_act_fn(config.activation_function)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h))
        x, _ = self.c_fc(self.ln_2(h))
        x, _ = self.c_proj(self.act(x))
        return h + x


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class TurboBackbone(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(TurboBlock(config, vllm_config, f"{prefix}.h.{i}") for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.speech_emb = nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = inputs_embeds if inputs_embeds is not None else self.speech_emb(input_ids)
        h = x + self.wpe(positions)
        for block in self.h:
            h = block(h)
        return self.ln_f(h)


class ChatterboxTurboT3ForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = TurboBackbone(vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        self.speech_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    @property
    def speech_emb(self) -> nn.Embedding:
        return self.model.speech_emb

    def embed_input_ids(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        return self.model.speech_emb(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.speech_head(hidden_states).float()
        logits[:, START_SPEECH] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = map_turbo_name(name)
            if target is None:
                continue
            param = params[target.param]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor.t() if target.transpose else tensor)
            loaded.add(target.param)
        return loaded
