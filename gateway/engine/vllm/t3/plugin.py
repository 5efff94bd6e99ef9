"""vLLM general plugin: registers the T3 architectures (the original's Llama T3, Turbo's
GPT-2 T3) in every vLLM process.

Entry point ``vllm.general_plugins: chatterbox_t3 = gateway.engine.vllm.t3.plugin:register``.
The registration is the lazy string form, so vLLM imports our model module only when it
builds the model; calling ``register`` again is a no-op.
"""

from __future__ import annotations

from gateway.engine.vllm.t3.config import ARCHITECTURE
from gateway.engine.vllm.t3.turbo import TURBO_ARCHITECTURE

MODEL_PATH = "gateway.engine.vllm.t3.model:ChatterboxT3ForCausalLM"
TURBO_MODEL_PATH = "gateway.engine.vllm.t3.turbo_model:ChatterboxTurboT3ForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for architecture, path in ((ARCHITECTURE, MODEL_PATH), (TURBO_ARCHITECTURE, TURBO_MODEL_PATH)):
        if architecture not in supported:
            ModelRegistry.register_model(architecture, path)
