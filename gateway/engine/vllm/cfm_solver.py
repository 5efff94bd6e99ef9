"""S3Gen's CFM solve (all Euler steps, with its CFG doubling) without per-step overhead.

Upstream ``CausalConditionalCFM.solve_euler`` rebuilds six doubled input buffers on every
step, and its estimator (``ConditionalDecoder.forward``) rebuilds the attention masks on every
step through ``add_optional_chunk_mask``, whose ``.item()`` check synchronises the host with
the GPU 17 times per step. Eager, each of the 10 steps is ~1,000 small kernels and 17 host
synchronisations, which is why it costs ~40-60 ms per step whatever the batch size.

:class:`CfmSolver` computes the same function with

* the doubled conditional/unconditional inputs, the attention biases and the time schedule
  built once per batch (:meth:`CfmSolver.solve_eager`, the path on the CPU and outside the
  graph buckets; no host synchronisation at all), and
* on CUDA, the whole solve (input doubling, biases, all steps) captured as one CUDA graph
  per bucketed ``(rows, frames)`` shape at start (:class:`GraphBuckets`), replayed with the
  batch copied into the graph's static inputs. Rows are padded with fully masked rows,
  frames with masked frames (the estimator is causal convolutions + masked attention, so
  right padding does not leak; padded rows are separate batch entries). All graphs share one
  memory pool: they never run concurrently (one worker thread) and each replay's output is
  copied out before the next.

Only the standard (non-meanflow, causal) estimator of ``ConditionalDecoder`` is mirrored
here; Turbo's mean-flow estimator has its own solver on the same machinery
(``meanflow_solver.MeanFlowSolver``, which overrides ``mirrors``, ``prepare`` and ``advance``).

Per estimator call it also launches fewer kernels than upstream's modules do, with the same
arithmetic (at one row the solve is bound by their number, not by its FLOPs: ~1,000 a call,
10 calls, ~100 ms for a first window on an H100): each transformer block's query, key and
value projections are one GEMM on their stacked weights (:class:`EstimatorWeights`); the
resnets' time projections ``mlp(t)``, constants of the step, are computed once per solver
(:meth:`CfmSolver.resnet_time_rows`), as is the step's time embedding; causal convolutions pad
inside the convolution instead of through ``F.pad``; masks already applied are not applied
again (a 0/1 mask: ``(h m + p) m == (h + p) m``); and the conditioning channels (``mu``, the
speaker, ``cond``) are packed once per solve. ~21% fewer operations a solve
(``python -m gateway.tools.bench_cfm_ops``).

The estimator's repeated parts run through two plain functions of ours,
:func:`transformer_block` (diffusers' ``BasicTransformerBlock`` with its ``Attention``, for
the configuration S3Gen uses: self-attention only, layer norms, no chunking) and
:func:`resnet_block`, so that ``compile`` can hand exactly those to ``torch.compile``
(inductor fuses the norms, activations, bias and residual adds and the mask products that
eager PyTorch runs as separate kernels). One compiled function serves all 56 transformer
blocks (their parameters are inputs, not constants): compile time is that of one block and
one resnet, not of the whole U-Net. Compiled code launches ordinary kernels, so the CUDA
graphs capture it as they capture eager code. If compiling fails (at capture or at run
time), the solver logs why and goes on with the plain functions: a compile problem costs
speed, never a start.

Attention (``attention``, the ``vocoder_attention`` setting). Upstream hands SDPA a float
key-padding bias, which rules out FlashAttention: on an H100 SDPA then runs cuDNN's attention
(``cudnn_generated_fort_native_sdpa_sm90_flash_fprop``, the profiler shows), every query over
every key of the graph bucket's width, padded rows included. A batch's rows are right-padded
(a row's real frames, then padding), so the same function is: each row's queries over its
first L keys (L its real frames). ``varlen`` computes exactly that with
FlashAttention's variable-length kernel (``aten._flash_attention_forward``): rows packed as
sequences of the bucket's width, each using only its first L keys (``seqused_k``,
:class:`RowKeys`, device tensors: the graphs capture it); no bias, no work on padded keys, none
at all for padded rows. It needs CUDA, fp16/bf16 and a head width FlashAttention takes;
elsewhere the solver keeps ``sdpa`` and says why (``attention_note``; a warning where
``varlen`` was asked for by name, none for ``auto``, which takes ``varlen`` wherever it runs).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from gateway.engine.vllm.graph_calls import capture_graph
from gateway.observability.compile_clock import CompileClock
from gateway.settings import VOCODER_COMPILE_CHOICES

log = logging.getLogger(__name__)

MEL_BINS = 80


@dataclass(frozen=True, slots=True)
class GraphBuckets:
    """The bounded set of (rows, frames) shapes captured as CUDA graphs."""

    rows: tuple[int, ...]
    frames: tuple[int, ...]
    max_cells: int
    """A shape is captured only if ``rows * frames <= max_cells`` (the batch budget)."""

    @classmethod
    def plan(cls, *, max_rows: int, max_frames: int, min_frames: int = 512, max_cells: int = 1 << 30,
             step: float = 1.25, align: int = 32, extra_frames: Sequence[int] = ()) -> GraphBuckets:
        """Rows: powers of two up to ``max_rows``. Frames: from ``min_frames`` growing by
        ``step`` (rounded up to ``align``) to ``max_frames``: at most ~25% padding; plus
        ``extra_frames`` (rounded up to ``align``, those within the range): widths that many
        solves have (the window schedule's, :func:`~gateway.engine.vllm.vocoder.schedule_frames`),
        so that they run with next to no padding."""
        rows = []
        r = 1
        while r < max_rows:
            rows.append(r)
            r *= 2
        rows.append(max_rows)
        frames: list[int] = []
        f = float(min_frames)
        while not frames or frames[-1] < max_frames:
            value = min(max_frames, -(-int(f) // align) * align)
            if not frames or value > frames[-1]:
                frames.append(value)
            f *= step
        frames += [a for a in (-(-int(e) // align) * align for e in extra_frames) if min_frames <= a <= max_frames]
        return cls(tuple(sorted(set(rows))), tuple(sorted(set(frames))), max_cells)

    def padding(self, frames: int) -> float:
        """The share of a solve of ``frames`` frames that its graph's width pads (1.0: none holds it)."""
        width = self.frames_for(frames)
        return 1.0 if width is None else 1.0 - frames / width

    def shapes(self) -> list[tuple[int, int]]:
        return [(r, f) for r in self.rows for f in self.frames if r * f <= self.max_cells]

    def fit(self, rows: int, frames: int) -> tuple[int, int] | None:
        """The smallest captured shape holding ``rows`` x ``frames``, or None (run eager)."""
        i = bisect.bisect_left(self.rows, rows)
        j = bisect.bisect_left(self.frames, frames)
        if i == len(self.rows) or j == len(self.frames):
            return None
        shape = (self.rows[i], self.frames[j])
        return shape if shape[0] * shape[1] <= self.max_cells else None

    def frames_for(self, frames: int) -> int | None:
        j = bisect.bisect_left(self.frames, frames)
        return self.frames[j] if j < len(self.frames) else None


def _mask_bias(mask: torch.Tensor, dtype: torch.dtype, heads: int) -> torch.Tensor:
    """Upstream ``mask_to_bias(add_optional_chunk_mask(...) == 1, dtype)`` for full context,
    without its host-synchronising all-masked-row check (such rows exist only as padding),
    as the (B, heads, 1, T) key-padding bias upstream's attention hands SDPA (one contiguous
    copy per batch instead of diffusers' ``repeat_interleave`` in each of the 56 blocks)."""
    bias = (1.0 - mask.bool().to(dtype)) * -1.0e10  # (B, 1, T)
    return bias.unsqueeze(1).expand(-1, heads, -1, -1).contiguous()


ATTENTION_MODES = ("sdpa", "varlen")
"""How the estimator's self-attention runs: ``sdpa`` with upstream's key-padding bias,
``varlen`` through FlashAttention's variable-length kernel (the module docstring)."""

ATTENTION_CHOICES = (*ATTENTION_MODES, "auto")
"""What a solver may be asked for: a mode, or ``auto``: ``varlen`` where it runs (CUDA, a
bf16/fp16 flow, a head width FlashAttention takes), ``sdpa`` elsewhere without a warning."""


class RowKeys(NamedTuple):
    """What :func:`varlen_attention` needs of a batch of ``rows`` right-padded rows of width T:
    where each row starts in the packed batch, and how many of its keys are real."""

    starts: torch.Tensor
    """(rows + 1,) int32: ``i T`` (FlashAttention's cumulative sequence lengths)."""
    lengths: torch.Tensor
    """(rows,) int32: each row's real frames L (0 for a padded row)."""


def row_keys(mask: torch.Tensor) -> RowKeys:
    """:class:`RowKeys` of a (rows, 1, frames) 0/1 ``mask`` that is a prefix per row (a row's
    real frames, then its padding). Device ops only: no host sync, captured in the graphs."""
    rows, _, frames = mask.shape
    starts = torch.arange(0, (rows + 1) * frames, frames, device=mask.device, dtype=torch.int32)
    return RowKeys(starts, mask[:, 0].to(torch.int32).sum(dim=-1, dtype=torch.int32))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: RowKeys, width: int) -> torch.Tensor:
    """Packed (rows x width, heads, dim) queries, keys and values: each row's queries over its
    first ``keys.lengths`` keys (a padded row's output is zeros), through FlashAttention's
    variable-length kernel (CUDA only)."""
    out = torch.ops.aten._flash_attention_forward(q, k, v, keys.starts, keys.starts, width, width, 0.0, False, False,
                                                  seqused_k=keys.lengths)
    return out[0]


Attending = torch.Tensor | RowKeys
"""What a transformer block's attention takes besides its input: the key-padding bias (sdpa)
or the rows' real keys (varlen)."""


def varlen_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why ``varlen`` attention cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"needs CUDA (the device is {device.type})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16 or bf16 (the flow runs in {dtype})"
    if head_dim % 8 or head_dim > 256:
        return f"FlashAttention takes head widths of multiples of 8 up to 256 (this one: {head_dim})"
    if not torch.backends.cuda.is_flash_attention_available():
        return f"this torch ({torch.__version__}) was built without FlashAttention"
    return None


def varlen_transformer_block(block: torch.nn.Module, wqkv: torch.Tensor, x: torch.Tensor,
                             keys: RowKeys) -> torch.Tensor:
    """:func:`transformer_block` with its attention through :func:`varlen_attention` (each row's
    queries over its real keys, :func:`row_keys`) instead of SDPA with the key-padding bias: the
    same function for every row with real frames. The packed queries, keys and values are views
    of the one projection (last dim contiguous, as FlashAttention takes them): no copies."""
    attn = block.attn1
    b, t, _ = x.shape
    qkv = F.linear(block.norm1(x), wqkv).view(b * t, 3, attn.heads, -1)
    q, k, v = qkv.unbind(1)  # each (b t, heads, d)
    o = varlen_attention(q, k, v, keys, t)
    x = attn.to_out[0](o.reshape(b, t, -1)) + x
    return block.ff(block.norm3(x)) + x


def transformer_block(block: torch.nn.Module, wqkv: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``BasicTransformerBlock.forward(x, attention_mask=...)`` for S3Gen's configuration
    (checked by :func:`plain_transformer_block`): pre-norm self-attention through SDPA with
    the key-padding bias, then the pre-norm feed-forward, each with its residual. ``wqkv``:
    the block's query, key and value weights as one matrix (:func:`fused_qkv`), so the three
    projections are one GEMM (one kernel where upstream launches three)."""
    attn = block.attn1
    b, t, _ = x.shape
    qkv = F.linear(block.norm1(x), wqkv).view(b, t, 3, attn.heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, heads, t, d), last dim contiguous
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # bias: (b, heads, 1, t)
    x = attn.to_out[0](o.transpose(1, 2).reshape(b, t, -1)) + x  # to_out[1]: dropout, identity in eval
    return block.ff(block.norm3(x)) + x


def plain_transformer_block(block: torch.nn.Module) -> bool:
    """Whether :func:`transformer_block` computes exactly what ``block`` does."""
    attn = getattr(block, "attn1", None)
    return (attn is not None and block.attn2 is None and not block.only_cross_attention
            and not block.use_ada_layer_norm and not block.use_ada_layer_norm_zero and block._chunk_size is None
            and attn.norm_q is None and attn.norm_k is None and attn.spatial_norm is None
            and attn.group_norm is None and not attn.residual_connection and attn.rescale_output_factor == 1.0
            and all(p.bias is None for p in (attn.to_q, attn.to_k, attn.to_v))
            and not block.training)


def fused_qkv(block: torch.nn.Module) -> torch.Tensor:
    """A transformer block's query, key and value weights stacked: ``(3 x inner, width)``."""
    attn = block.attn1
    return torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach()


def causal_conv(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Upstream ``CausalConv1d`` (left zero padding, then the convolution) with the padding
    done by the convolution itself: both ends padded, the right end's extra outputs dropped.
    Each kept output sums the same products; the separate ``F.pad`` kernel is gone."""
    pad = conv.causal_padding[0]  # upstream: kernel_size - 1 zeros on the left, whatever the dilation
    y = F.conv1d(x, conv.weight, conv.bias, stride=1, padding=pad, dilation=conv.dilation, groups=conv.groups)
    return y[..., :y.shape[-1] - pad] if pad else y


def conv_of(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for the estimator's convolutions, causal ones through :func:`causal_conv`."""
    from chatterbox.models.s3gen.decoder import CausalConv1d

    return causal_conv(module, x) if type(module) is CausalConv1d else module(x)


def causal_block(block: torch.nn.Module, x_masked: torch.Tensor) -> torch.Tensor:
    """``CausalBlock1D.block`` (causal conv, layer norm over channels, Mish) of an input already
    masked; the caller applies the output mask (or folds it into the next one)."""
    conv, _, norm, _, act = block.block
    return act(norm(causal_conv(conv, x_masked).transpose(1, 2)).transpose(1, 2))


def plain_causal_block(block: torch.nn.Module) -> bool:
    """Whether :func:`causal_block` computes ``block``'s inner sequence: upstream's
    ``CausalBlock1D`` (causal conv, transpose, layer norm, transpose, Mish)."""
    from chatterbox.models.s3gen.decoder import CausalBlock1D, CausalConv1d, Transpose

    parts = list(getattr(block, "block", ()))
    return (type(block) is CausalBlock1D and len(parts) == 5 and type(parts[0]) is CausalConv1d
            and type(parts[1]) is Transpose and isinstance(parts[2], torch.nn.LayerNorm)
            and type(parts[3]) is Transpose and isinstance(parts[4], torch.nn.Mish))


def plain_resnet_block(resnet: torch.nn.Module) -> bool:
    """Whether :func:`resnet_block` computes exactly what ``resnet`` (with its time
    projection given) does: upstream's ``CausalResnetBlock1D`` of causal blocks."""
    return plain_causal_block(resnet.block1) and plain_causal_block(resnet.block2) and not resnet.training


def resnet_block(resnet: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, tproj: torch.Tensor) -> torch.Tensor:
    """``CausalResnetBlock1D.forward(x, mask, t)`` with its time projection ``mlp(t)`` given
    (``tproj``, (rows or 1, channels): :meth:`CfmSolver.step_rows`). Upstream masks ``x``
    twice (for ``block1`` and for the residual conv) and masks ``block1``'s output before
    adding the time projection and masking the sum again for ``block2``; the mask is 0 or 1,
    so ``(h * m + p) * m == (h + p) * m`` exactly and one product of each pair does."""
    xm = x * mask
    h = causal_block(resnet.block1, xm) + tproj.unsqueeze(-1)
    h = causal_block(resnet.block2, h * mask) * mask
    return h + resnet.res_conv(xm)


def module_resnet_block(resnet: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor,
                        tproj: torch.Tensor) -> torch.Tensor:
    """A resnet of a configuration :func:`resnet_block` does not mirror, through its modules
    (``ResnetBlock1D.forward`` with the time projection given)."""
    h = resnet.block1(x, mask) + tproj.unsqueeze(-1)
    h = resnet.block2(h, mask)
    return h + resnet.res_conv(x * mask)


@dataclass(frozen=True, slots=True)
class Blocks:
    """The functions that run the estimator's repeated parts (plain, or compiled)."""

    transformer: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Any], torch.Tensor] = transformer_block
    resnet: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = resnet_block


PLAIN = Blocks()
VARLEN = Blocks(transformer=varlen_transformer_block)


def plain_blocks(attention: str) -> Blocks:
    """The plain (not compiled) blocks for an ``attention`` mode (:data:`ATTENTION_MODES`)."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {attention!r}")
    return VARLEN if attention == "varlen" else PLAIN


COMPILE_MODES = tuple(mode for mode in VOCODER_COMPILE_CHOICES if mode != "off")
"""``vocoder_compile`` values other than ``off`` (:func:`compiled_blocks`)."""


def frames_symbolic(fn: Callable[..., torch.Tensor], frame_dims: tuple[int, ...]) -> Callable[..., torch.Tensor]:
    """``fn`` (a function ``torch.compile`` made) with the frames dimension of its tensor
    arguments marked dynamic before each call: ``frame_dims[i]`` is that dimension of argument
    ``i`` (-1: none). Every graph width of one row count then shares one compile; the row
    count stays a constant of the kernels (``maybe_mark_dynamic``: a dimension the trace must
    specialise is compiled static, with a recompile per width, never an error)."""
    import torch._dynamo

    def call(*args: Any) -> torch.Tensor:
        for arg, dim in zip(args, frame_dims, strict=False):
            if dim >= 0 and isinstance(arg, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(arg, dim)
        return fn(*args)

    return call


def compiled_blocks(mode: str, attention: str = "sdpa") -> Blocks:
    """:class:`Blocks` through ``torch.compile`` (inductor, no cudagraphs of its own: ours
    capture it). ``dynamic``: one symbolic-shape compile for all shapes; ``static``: one per
    graph bucket (rows x frames: kernels for exact sizes; with ``vocoder_max_batch`` 32, 48
    buckets of five compiled frames each, ~145 s of an H100 start with warm caches, 2026-12-07);
    ``rows``: one per row count, the frames symbolic (the widths of a row count share it: 6
    row counts instead of 48 buckets)."""
    import torch._dynamo

    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}")
    plain = plain_blocks(attention)
    # static and rows: an entry per shape (or row count), more than dynamo's default of 8
    # recompiles per function.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 256)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
    dynamic = mode == "dynamic"
    transformer = torch.compile(plain.transformer, dynamic=dynamic, fullgraph=True)
    resnet = torch.compile(plain.resnet, dynamic=dynamic, fullgraph=True)
    if mode == "rows":
        # transformer(block, wqkv, x (b, t, c), bias (b, heads, 1, t) | RowKeys: no frames dim);
        # resnet(resnet, x (b, c, t), mask (b, 1, t), tproj (b | 1, c)).
        bias_dim = 3 if attention == "sdpa" else -1
        transformer = frames_symbolic(transformer, (-1, -1, 1, bias_dim))
        resnet = frames_symbolic(resnet, (-1, 2, 2, -1))
    return Blocks(transformer=transformer, resnet=resnet)


@dataclass(frozen=True, slots=True)
class EstimatorWeights:
    """What :func:`estimator_forward` takes beyond the estimator's own modules: each
    transformer block's fused query/key/value weights (in block order: down, mid, up)."""

    qkv: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, est: torch.nn.Module) -> EstimatorWeights:
        return cls(tuple(fused_qkv(b) for b in _transformer_blocks(est)))


def estimator_forward(est: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor,
                      step_rows: Sequence[torch.Tensor], biases: Sequence[Attending], weights: EstimatorWeights,
                      blocks: Blocks = PLAIN) -> torch.Tensor:
    """``ConditionalDecoder.forward`` of ``x`` with what does not change between a solve's
    steps given: ``inputs`` (the packed ``mu``, speaker and ``cond`` channels:
    :func:`packed_inputs`), the step's time projection for each resnet (``step_rows``, in
    resnet order), the attention biases (``biases[i]`` for the i-th mask level) and the fused
    weights; its resnets and transformer blocks run by ``blocks``."""
    x = torch.cat([x, inputs], dim=1)
    rows = iter(step_rows)
    qkv = iter(weights.qkv)
    hiddens = []
    masks = [mask]
    level = 0
    for resnet, layers, downsample in est.down_blocks:
        mask_down = masks[-1]
        x = blocks.resnet(resnet, x, mask_down, next(rows))
        x = rearrange(x, "b c t -> b t c").contiguous()
        for block in layers:
            x = blocks.transformer(block, next(qkv), x, biases[level])
        x = rearrange(x, "b t c -> b c t").contiguous()
        hiddens.append(x)
        x = conv_of(downsample, x * mask_down)
        masks.append(mask_down[:, :, ::2])
        level += 1
    masks = masks[:-1]
    level -= 1
    mask_mid = masks[-1]
    for resnet, layers in est.mid_blocks:
        x = blocks.resnet(resnet, x, mask_mid, next(rows))
        x = rearrange(x, "b c t -> b t c").contiguous()
        for block in layers:
            x = blocks.transformer(block, next(qkv), x, biases[level])
        x = rearrange(x, "b t c -> b c t").contiguous()
    for resnet, layers, upsample in est.up_blocks:
        mask_up = masks.pop()
        bias = biases[len(masks)]
        skip = hiddens.pop()
        x = torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1)
        x = blocks.resnet(resnet, x, mask_up, next(rows))
        x = rearrange(x, "b c t -> b t c").contiguous()
        for block in layers:
            x = blocks.transformer(block, next(qkv), x, bias)
        x = rearrange(x, "b t c -> b c t").contiguous()
        x = conv_of(upsample, x * mask_up)
    # final_block(x, m) = block(x * m) * m; final_proj's input mask is then already applied.
    x = causal_block(est.final_block, x * mask_up) * mask_up
    return est.final_proj(x) * mask


def packed_inputs(mu: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The estimator's input channels after ``x`` (``mu``, the speaker embedding repeated over
    time, ``cond``), packed once per solve: they are the same at every step."""
    return torch.cat([mu, spks[:, :, None].expand(-1, -1, mu.shape[-1]), cond], dim=1)


@dataclass(frozen=True, slots=True)
class Prepared:
    """What all steps of one solve share (:meth:`CfmSolver.prepare`)."""

    mask: torch.Tensor
    inputs: torch.Tensor
    biases: list[Attending]


class CfmSolver:
    """The S3Gen CFM solve for padded batches (see the module docstring). Blocking; one
    worker thread only (graphs and their static buffers are not thread safe)."""

    def __init__(self, decoder: torch.nn.Module, *, steps: int, device: torch.device | str,
                 dtype: torch.dtype, compile: str = "off", attention: str = "sdpa") -> None:
        self.decoder = decoder
        self.est = decoder.estimator
        self.steps = steps
        self.device = torch.device(device)
        self.dtype = dtype
        self.cfg_rate = float(decoder.inference_cfg_rate)
        self.mirrored = self.mirrors(self.est)
        plain_t = self.mirrored and all(plain_transformer_block(b) for b in _transformer_blocks(self.est))
        plain_r = self.mirrored and all(plain_resnet_block(r) for r in _resnets(self.est))
        self.blocks = PLAIN if (plain_t and plain_r) or not self.mirrored else Blocks(
            transformer=transformer_block if plain_t else _module_block,
            resnet=resnet_block if plain_r else module_resnet_block)
        blocks = _transformer_blocks(self.est) if self.mirrored else []
        self.heads = int(blocks[0].attn1.heads) if blocks else 1
        if attention not in ATTENTION_CHOICES:  # an error wherever it would run
            raise ValueError(f"unknown attention mode {attention!r}")
        self.attention_note: str | None = None
        """Why ``varlen`` (asked for, or ``auto``'s first choice) does not run (None: it does,
        or ``sdpa`` was asked for)."""
        if attention in ("varlen", "auto"):
            head_dim = int(blocks[0].attn1.to_q.weight.shape[0]) // self.heads if blocks else 0
            self.attention_note = ("the estimator's blocks are not the plain ones it mirrors" if not (plain_t and plain_r)
                                   else varlen_supported(self.device, dtype, head_dim))
            if self.attention_note is not None:
                # asked for by name, a warning; ``auto`` just takes SDPA (a CPU server, a fp32 flow)
                (log.warning if attention == "varlen" else log.info)(
                    "CFM estimator: varlen attention %s; SDPA with the padding bias instead", self.attention_note)
        self.attention = "varlen" if attention != "sdpa" and self.attention_note is None else "sdpa"
        """The attention in use (:data:`ATTENTION_MODES`)."""
        if self.attention == "varlen":
            self.blocks = VARLEN
        self.compile = compile if plain_t and plain_r else "off"
        """The compile mode in use: ``off`` after a failure (``compile_error`` says why)."""
        self.compile_error: str | None = None
        if self.compile != "off":
            self.blocks = compiled_blocks(self.compile, self.attention)
        self.t_span = self.time_span()
        # Constants of the model, the step count and the dtype, made once here (outside any
        # graph): the estimator's weights are final when the vocoder builds its solvers.
        self.weights = EstimatorWeights.of(self.est) if self.mirrored else EstimatorWeights(())
        self.step_rows = self.resnet_time_rows() if self.mirrored else []
        """``step_rows[k][i]``: resnet i's time projection ``mlp(t_k)`` at step k, (1, channels)."""
        self.step_tables = [torch.cat([rows[i] for rows in self.step_rows]) for i in range(len(self.step_rows[0]))] \
            if self.step_rows else []
        """``step_tables[i][k]``: ``step_rows[k][i]``, for a stepped graph that picks its step on the device."""
        self.step_dts = self.t_span[1:] - self.t_span[:-1]
        """Each step's length (steps,), as :meth:`solve_eager` computes it."""
        self.stepped = False
        """Whether the captured graphs are single steps (``capture(..., stepped=True)``)."""
        self.buckets: GraphBuckets | None = None
        self.pool: tuple[int, int] | None = None
        """The graph memory pool (after ``capture``), for another solver to share."""
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self.graph_bytes = 0
        self.graph_replays = 0
        self.eager_runs = 0

    @staticmethod
    def mirrors(est: torch.nn.Module) -> bool:
        """Whether :meth:`solve_eager` computes this estimator's solve itself (else upstream's
        decoder call runs it, never captured). A solver for another estimator overrides both."""
        return (not getattr(est, "meanflow", False) and getattr(est, "causal", False) and len(est.down_blocks) >= 1
                and plain_causal_block(est.final_block))

    def time_span(self) -> torch.Tensor:
        """The solve's ``steps + 1`` times: upstream's cosine schedule over [0, 1] in the flow dtype."""
        t_span = torch.linspace(0, 1, self.steps + 1, device=self.device, dtype=self.dtype)
        if self.decoder.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        return t_span

    @torch.inference_mode()
    def step_embeddings(self) -> torch.Tensor:
        """(steps, E): each step's time embedding ``time_mlp(time_embeddings(t_k))``, as the
        estimator computes it (the same for every row)."""
        est = self.est
        return est.time_mlp(est.time_embeddings(self.t_span[:-1]).to(self.dtype))

    @torch.inference_mode()
    def resnet_time_rows(self) -> list[list[torch.Tensor]]:
        """Every step's time projection of every resnet (``resnet.mlp(t_emb)``): upstream
        computes them in each estimator call, for every row; they depend only on the step."""
        emb = self.step_embeddings()
        return [[r.mlp(emb[k:k + 1]) for r in _resnets(self.est)] for k in range(self.steps)]

    def attention_biases(self, mask: torch.Tensor) -> list[Attending]:
        """What the estimator's attention takes at each of its mask levels (built once per
        batch): the key-padding bias (``sdpa``) or the rows' real keys (``varlen``, :func:`row_keys`)."""
        biases = []
        for _ in range(len(self.est.down_blocks)):
            biases.append(row_keys(mask) if self.attention == "varlen" else _mask_bias(mask, self.dtype, self.heads))
            mask = mask[:, :, ::2]
        return biases

    # --- eager -----------------------------------------------------------------------------
    def prepare(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor) -> Prepared:
        """What every step of one solve shares (in the flow dtype): the CFG-doubled mask and
        inputs (the unconditional half's are zeros) and the attention's biases or keys."""
        b = mu.shape[0]
        mask_in = torch.cat([mask, mask])
        inputs = torch.cat([packed_inputs(mu, spks, cond), mu.new_zeros(b, 3 * MEL_BINS, mu.shape[-1])])
        return Prepared(mask_in, inputs, self.attention_biases(mask_in))

    def advance(self, x: torch.Tensor, prep: Prepared, tprojs: Sequence[torch.Tensor], dt: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``x``: ``(1 + r) v(x | mu, spks, cond) - r v(x | 0, 0, 0)``,
        ``tprojs`` the step's time projection of each resnet, ``dt`` the step's length."""
        b = x.shape[0]
        v = estimator_forward(self.est, torch.cat([x, x]), prep.mask, prep.inputs, tprojs, prep.biases,
                              self.weights, self.blocks)
        v_cond, v_uncond = torch.split(v, [b, b], dim=0)
        v = (1.0 + self.cfg_rate) * v_cond - self.cfg_rate * v_uncond
        return x + dt * v

    def indexed_step(self, x: torch.Tensor, k: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor,
                     spks: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Step ``k`` ((1,) int64 on the device: the step a stepped graph picks when replayed)
        of the solve of the flow-dtype inputs, from ``x``: what :meth:`solve_eager`'s step k
        computes, the per-batch work redone (a few small kernels beside the estimator's ~1,000)."""
        prep = self.prepare(mu, mask, spks, cond)
        tprojs = [table.index_select(0, k) for table in self.step_tables]
        return self.advance(x, prep, tprojs, self.step_dts.index_select(0, k))

    @torch.inference_mode()
    def solve_eager(self, noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                    cond: torch.Tensor) -> torch.Tensor:
        """(B, 80, T) mel in the flow dtype: Euler from ``noise`` over ``steps`` steps
        (:meth:`advance`), the per-batch work (:meth:`prepare`) done once."""
        return drain(self._eager_steps(noise, mu, mask, spks, cond))

    @torch.inference_mode()
    def _eager_steps(self, noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                     cond: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        if not self.mirrored:
            feat, _ = self.decoder(mu=mu, mask=mask, spks=spks, cond=cond, n_timesteps=self.steps,
                                   noised_mels=noise)
            return feat
        dt = self.dtype
        x, mu, mask, spks, cond = (a.to(dt) for a in (noise, mu, mask, spks, cond))
        prep = self.prepare(mu, mask, spks, cond)
        t_span = self.t_span
        for k in range(self.steps):
            x = self.advance(x, prep, self.step_rows[k], t_span[k + 1] - t_span[k])
            if k < self.steps - 1:
                yield
        return x

    # --- CUDA graphs -------------------------------------------------------------------------
    def capture(self, buckets: GraphBuckets, pool: tuple[int, int] | None = None, *, stepped: bool = False) -> float:
        """Capture one graph per shape of ``buckets`` (CUDA only); returns seconds taken.
        ``pool``: a graph memory pool to share (solvers whose graphs never run at once).
        ``stepped``: each graph one Euler step, replayed ``steps`` times with the solve's state
        in buffers of its own, so that a stepwise solve (:meth:`solve_stepwise`) can stop
        between steps; else each graph the whole solve (one replay)."""
        self.stepped = stepped
        if self.device.type != "cuda" or not self.mirrored:
            return 0.0
        t0 = time.perf_counter()
        clock = CompileClock()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        try:
            self._capture_all(buckets)
        except Exception as exc:  # noqa: BLE001 - compiled code that cannot be captured: go on without
            if self.compile == "off":
                raise
            self._stop_compiling(exc)
            self._capture_all(buckets)
        torch.cuda.synchronize(self.device)
        self.graph_bytes = torch.cuda.memory_reserved(self.device) - before
        self.buckets = buckets
        seconds = time.perf_counter() - t0
        compiled = f"; {clock.read().describe()}" if self.compile != "off" else ""
        log.info("captured %d CFM graphs in %.1f s (%.0f MiB)%s", len(self._graphs), seconds,
                 self.graph_bytes / 2**20, compiled)
        return seconds

    def _capture_all(self, buckets: GraphBuckets) -> None:
        self._graphs.clear()
        # Largest first: the shared pool is sized by the first capture, later ones fit in it.
        for rows, frames in sorted(buckets.shapes(), key=lambda s: -s[0] * s[1]):
            kind = _StepGraph if self.stepped else _Graph
            self._graphs[(rows, frames)] = kind(self, rows, frames, self.pool)

    def _stop_compiling(self, exc: BaseException) -> None:
        self.compile_error = f"{type(exc).__name__}: {exc}"[:500]
        log.warning("CFM estimator: torch.compile failed (%s); continuing with the plain blocks",
                    self.compile_error)
        self.compile, self.blocks = "off", plain_blocks(self.attention)

    def frames_for(self, frames: int) -> int:
        """The padded frame count a batch of ``frames`` runs at (graph width or as is)."""
        if self.buckets is None:
            return frames
        return self.buckets.frames_for(frames) or frames

    def solve(self, noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
              cond: torch.Tensor) -> torch.Tensor:
        """As :meth:`solve_eager`; through a captured graph when the shape fits one."""
        return drain(self.solve_stepwise(noise, mu, mask, spks, cond))

    @torch.inference_mode()
    def solve_stepwise(self, noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                       cond: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        """:meth:`solve` as a generator that queues one Euler step per resumption and yields
        between steps (``steps - 1`` times; none inside a whole-solve graph, one replay):
        where its caller may let other device work go first. Returns the (B, 80, T) mel."""
        shape = None if self.buckets is None else self.buckets.fit(noise.shape[0], noise.shape[2])
        graph = self._graphs.get(shape) if shape is not None else None
        if graph is None:
            self.eager_runs += 1
            if self.compile == "off":
                return (yield from self._eager_steps(noise, mu, mask, spks, cond))
            try:  # a compiled block's recompile for a new shape may fail: the plain blocks then
                return drain(self._eager_steps(noise, mu, mask, spks, cond))
            except Exception as exc:  # noqa: BLE001 - a recompile for a new shape failed
                self._stop_compiling(exc)
                return (yield from self._eager_steps(noise, mu, mask, spks, cond))
        self.graph_replays += 1
        if isinstance(graph, _StepGraph):
            return (yield from graph.steps(noise, mu, mask, spks, cond))
        return graph.run(noise, mu, mask, spks, cond)


def drain(steps: Generator[None, None, Any]) -> Any:
    """Run a stepwise generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _transformer_blocks(est: torch.nn.Module) -> list[torch.nn.Module]:
    groups = [*est.down_blocks, *est.mid_blocks, *est.up_blocks]
    return [block for group in groups for block in group[1]]


def _resnets(est: torch.nn.Module) -> list[torch.nn.Module]:
    """The estimator's resnets in the order ``estimator_forward`` runs them."""
    return [group[0] for group in (*est.down_blocks, *est.mid_blocks, *est.up_blocks)]


def _module_block(block: torch.nn.Module, wqkv: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A transformer block of a configuration :func:`transformer_block` does not mirror, run
    as upstream calls it (its bias per key, as upstream's (B, 1, T))."""
    return block(hidden_states=x, attention_mask=bias[:, :1, 0])


class _Graph:
    """One captured solve of shape (rows, frames) and its static inputs."""

    def __init__(self, solver: CfmSolver, rows: int, frames: int, pool: tuple[int, int]) -> None:
        dev, dt = solver.device, solver.dtype
        self.rows, self.frames = rows, frames
        gen = torch.Generator(device=dev).manual_seed(0)
        # Random (not zero) inputs for warm-up and capture: the same kernels real data takes.
        self.noise = torch.randn(rows, MEL_BINS, frames, device=dev, dtype=dt, generator=gen)
        self.mu = torch.randn(rows, MEL_BINS, frames, device=dev, dtype=dt, generator=gen)
        self.cond = torch.randn(rows, MEL_BINS, frames, device=dev, dtype=dt, generator=gen)
        self.spks = torch.randn(rows, MEL_BINS, device=dev, dtype=dt, generator=gen)
        self.mask = torch.ones(rows, 1, frames, device=dev, dtype=dt)
        args = (self.noise, self.mu, self.mask, self.spks, self.cond)
        self.graph, self.out = capture_graph(self._captured(solver), args, pool)

    def _captured(self, solver: CfmSolver) -> Callable[..., torch.Tensor]:
        return solver.solve_eager

    def _load(self, noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
              cond: torch.Tensor) -> None:
        """The batch into the static inputs, zero-padded to the graph's rows and frames."""
        b, _, t = noise.shape
        for static, value in ((self.noise, noise), (self.mu, mu), (self.cond, cond)):
            static.zero_()
            static[:b, :, :t] = value
        self.mask.zero_()
        self.mask[:b, :, :t] = mask
        self.spks.zero_()
        self.spks[:b] = spks

    def run(self, noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
            cond: torch.Tensor) -> torch.Tensor:
        """The whole solve: one replay."""
        b, _, t = noise.shape
        self._load(noise, mu, mask, spks, cond)
        self.graph.replay()
        # Copied out: another graph of the shared pool may overwrite ``out`` on its replay.
        return self.out[:b, :, :t].clone()


class _StepGraph(_Graph):
    """One Euler step of shape (rows, frames) captured (:meth:`CfmSolver.capture` with
    ``stepped``), replayed once per step. The solve's state (``x``, the step index ``k``)
    lives in buffers of its own, allocated outside the graph pool, so between two replays
    other graphs may run (this one's intermediates are dead by then); the step picks its time
    projections and length on the device (:meth:`CfmSolver.indexed_step`), so one graph serves
    every step. Computes exactly what :meth:`CfmSolver.solve_eager` computes."""

    def __init__(self, solver: CfmSolver, rows: int, frames: int, pool: tuple[int, int]) -> None:
        self.n_steps = solver.steps  # not ``steps``: that is the method that replays them
        self.x = torch.zeros(rows, MEL_BINS, frames, device=solver.device, dtype=solver.dtype)
        self.k = torch.zeros(1, device=solver.device, dtype=torch.long)
        super().__init__(solver, rows, frames, pool)

    def _captured(self, solver: CfmSolver) -> Callable[..., torch.Tensor]:
        def step(noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                 cond: torch.Tensor) -> torch.Tensor:
            self.x.copy_(solver.indexed_step(self.x, self.k, mu, mask, spks, cond))
            self.k.add_(1)
            return self.x

        return step

    def steps(self, noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
              cond: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        """The solve a replay per step, yielding between steps."""
        b, _, t = noise.shape
        self._load(noise, mu, mask, spks, cond)
        self.x.copy_(self.noise)
        self.k.zero_()
        for k in range(self.n_steps):
            self.graph.replay()
            if k < self.n_steps - 1:
                yield
        return self.x[:b, :, :t].clone()
