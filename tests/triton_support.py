"""Triton kernels built for an H100 (sm_90) on a machine without a GPU, through Triton's own
ptxas: what a GPU visit would otherwise find first. Each build runs in a fresh interpreter
(Triton's interpreter, which the kernel tests run, leaves ``triton.language`` patched for a
compile)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_for_h100(kernel: str, signature: dict[str, str], variants: list[dict], *, num_warps: int = 4) -> list[dict]:
    """``kernel`` (``module:attribute``, a ``triton.jit`` function) compiled for sm_90 once per
    ``variants`` entry (its constexprs; ``num_warps`` may be given per entry); for each, whether
    a cubin came out and whether its PTX calls libdevice's ``__nv_sinf`` / ``sin.approx``."""
    script = textwrap.dedent("""
        import importlib, json, sys, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        spec = json.loads(sys.argv[1])
        module, name = spec["kernel"].split(":")
        fn = getattr(importlib.import_module(module), name)
        for constexprs in spec["variants"]:
            warps = constexprs.pop("num_warps", spec["num_warps"])
            built = triton.compile(ASTSource(fn=fn, signature=spec["signature"], constexprs=constexprs),
                                   target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            ptx = built.asm["ptx"]
            print(json.dumps({"cubin": len(built.asm["cubin"]) > 0, "nv_sinf": "__nv_sinf" in ptx,
                              "sin_approx": "sin.approx" in ptx}))
    """)
    spec = {"kernel": kernel, "signature": signature, "variants": variants, "num_warps": num_warps}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
