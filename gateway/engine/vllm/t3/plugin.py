"""vLLM general plugin: registers the T3 architectures (the original's Llama T3, Turbo's
GPT-2 T3) in every vLLM process, and lets an input batch whose only custom logits processor
is T3's fused sampling skip vLLM's per-step wait for output ids (``fused_rows.spare_output_ids``).

Entry point ``vllm.general_plugins: chatterbox_t3 = gateway.engine.vllm.t3.plugin:register``.
The registration is the lazy string form, so vLLM imports our model module only when it
builds the model; calling ``register`` again is a no-op.
"""

from __future__ import annotations

import functools

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
    _spare_output_ids_in_input_batches()


def _spare_output_ids_in_input_batches() -> None:
    """Wrap vLLM 0.24's ``InputBatch.__init__`` (once) so that every input batch built from
    then on goes through :func:`gateway.engine.vllm.t3.fused_rows.spare_output_ids`."""
    from vllm.v1.worker.gpu_input_batch import InputBatch

    from gateway.engine.vllm.t3.fused_rows import spare_output_ids

    original = InputBatch.__init__
    if getattr(original, "chatterbox_spares_output_ids", False):
        return

    @functools.wraps(original)
    def init(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        spare_output_ids(self)

    init.chatterbox_spares_output_ids = True  # type: ignore[attr-defined]
    InputBatch.__init__ = init  # type: ignore[method-assign]
