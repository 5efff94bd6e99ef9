"""vLLM general plugin: registers the T3 architecture in every vLLM process.

Entry point ``vllm.general_plugins: chatterbox_t3 = gateway.engine.vllm.t3.plugin:register``.
The registration is the lazy string form, so vLLM imports our model module only when it
builds the model; calling ``register`` again is a no-op.
"""

from __future__ import annotations

from gateway.engine.vllm.t3.config import ARCHITECTURE

MODEL_PATH = "gateway.engine.vllm.t3.model:ChatterboxT3ForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE in ModelRegistry.get_supported_archs():
        return
    ModelRegistry.register_model(ARCHITECTURE, MODEL_PATH)
