"""Chatterbox T3 on vLLM 0.24: the model (imported by vLLM only), its plugin, its config,
the CPU-side prompt builder and the position side channel that links them."""
