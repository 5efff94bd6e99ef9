"""Where the vLLM engine's compile caches live: under ``cache_dir`` (``<cache_dir>/compile``),
next to the weights and the voice conditionals, unless the environment already names them.

vLLM compiles T3 (torch.compile, its AOT artifacts), inductor the compiled CFM estimator
(``vocoder_compile``) and Triton their kernels, each into a cache of its own that by default
lies outside ``cache_dir`` (``~/.cache/vllm``, ``/tmp/torchinductor_<user>``, ``~/.triton``):
in the Docker image, whose only volume is ``/cache``, every new container compiled everything
again. With the caches warm a server with the original model was ready in ~90-105 s against
~170-200 s cold, and with the compiled estimator in ~240 s against ~370 s (H100, 2026-12-06/07,
docs/benchmarks.md). Set before anything compiles: vLLM, inductor and Triton read these
variables when they use them, and vLLM's engine-core process inherits them."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

CACHES = (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton"))
"""Each compile cache's environment variable and its folder under ``<cache_dir>/compile``."""


def use_compile_caches(cache_dir: str | os.PathLike[str],
                       environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Point every compile cache the environment does not name at ``<cache_dir>/compile/<name>``;
    returns where each one is (the environment's own choice kept). Importing ``torch._dynamo``
    (upstream's model code does) writes inductor's default, ``/tmp/torchinductor_<user>``, into
    the environment: that value counts as not named."""
    root = Path(cache_dir).expanduser() / "compile"
    where: dict[str, str] = {}
    for variable, folder in CACHES:
        value = environ.get(variable)
        if not value or value == _torch_default(variable):
            environ[variable] = value = str(root / folder)
        where[variable] = value
    return where


def _torch_default(variable: str) -> str | None:
    if variable != "TORCHINDUCTOR_CACHE_DIR":
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return default_cache_dir()
