"""One typed settings object, read from the environment and the command line in one place.

Every field can be set as an environment variable ``CHATTERBOX_<FIELD>`` (upper case) or as a
``serve`` flag ``--<field-with-dashes>``. Nothing here is read at import time: call
:func:`load_settings` and pass the result down.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args

import msgspec
from msgspec import Meta

ENV_PREFIX = "CHATTERBOX_"

# The Hub checkpoint and the exact revision we load: a pinned commit, never a moving branch.
DEFAULT_HF_REPO = "ResembleAI/chatterbox"
DEFAULT_HF_REVISION = "5bb1f6ee58e50c3b8d408bc82a6d3740c2db6e18"

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeFloat = Annotated[float, Meta(ge=0.0)]


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "chatterbox-gateway")


VocoderCompile = Literal["off", "dynamic", "static", "rows"]
"""``vocoder_compile``'s values (the CFM solver's ``compile`` modes, and ``off``)."""
VOCODER_COMPILE_CHOICES: tuple[str, ...] = get_args(VocoderCompile)


class Settings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # --- HTTP -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    """TCP port to listen on."""
    max_body_bytes: PositiveInt = 128 * 1024
    """Largest JSON body accepted on /v1/audio/speech (413 beyond). The largest valid body
    (4096 characters of input and of instructions, every one a JSON escape) is about 100 KB."""
    max_upload_bytes: PositiveInt = 10 * 1_048_576
    """Largest voice clip accepted on POST /v1/audio/voices (413 beyond)."""
    api_keys: tuple[str, ...] = ()
    """Accepted bearer keys (comma separated in the environment). Empty: any key is accepted."""
    api_keys_file: str | None = None
    """A file with one accepted key per line, merged with ``api_keys``."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed to call the API from a browser ("*" for any). Empty: CORS off."""
    playground_enabled: bool = True
    """Serve the playground page at ``/`` (a browser page to try the API; it uses the same keys)."""
    metrics_enabled: bool = True
    """Serve Prometheus metrics at /metrics."""
    metrics_require_auth: bool = False
    """Ask for an API key on /metrics too (when keys are configured)."""
    loop_lag_probe_s: Annotated[float, Meta(ge=0.0, le=60.0)] = 0.25
    """With metrics on: how often a task measures how late the event loop wakes it
    (``chatterbox_event_loop_lag_seconds``; 0: off)."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """auto: console lines on a terminal, JSON lines otherwise."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe log level written."""

    # --- Connections (what a client may hold before and while it is served) -----------------
    max_connections: PositiveInt = 1000
    """Open connections at most (also kept below the process's file-descriptor limit). At the
    cap, a connection waiting for its headers or its body is evicted to make room (idle and
    half-sent ones first, the newest last); when every connection is busy, new ones are
    refused."""
    listen_backlog: PositiveInt = 256
    """Connections the kernel queues before they are accepted."""
    header_timeout_s: Annotated[float, Meta(gt=0.0)] = 10.0
    """Time a client has to send a request's line and headers, from its first byte (or from
    the connection's start)."""
    body_timeout_s: Annotated[float, Meta(gt=0.0)] = 60.0
    """Time a client has to send a request body, once the headers are in (time the server was
    not reading does not count); past it 408 and the connection is closed."""
    keep_alive_timeout_s: Annotated[float, Meta(gt=0.0)] = 5.0
    """An idle keep-alive connection is closed after this long."""
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 16_384
    """Largest request line plus headers, however they arrive (431 beyond, and closed)."""
    send_timeout_s: Annotated[float, Meta(gt=0.0)] = 10.0
    """Longest a client may leave one response write pending (stop reading); then the response
    is abandoned like a disconnect: engine job dropped, encoder killed, slot released."""

    # --- TLS (https:// and wss://; gateway/http/tls.py) ---------------------------------------
    ssl_certfile: str | None = None
    """PEM certificate (chain) to serve HTTPS and WSS with, on the same port. Unset: plain HTTP."""
    ssl_keyfile: str | None = None
    """PEM private key of ssl_certfile (unset: the key is in the ssl_certfile file)."""

    # --- Request bodies (what an unfinished body may hold) --------------------------------
    body_min_rate_bytes_s: Annotated[int, Meta(ge=0)] = 1024
    """Slowest average rate a request body may arrive at, in bytes per second, once
    body_rate_grace_s has passed (time the server itself was not reading does not count);
    slower: 408 and the connection is closed. 0: no rate (body_timeout_s still holds)."""
    body_rate_grace_s: Annotated[float, Meta(gt=0.0)] = 5.0
    """Time a request body may take before body_min_rate_bytes_s applies (each connection
    gets up to half again as much, at random, so bodies started together end apart)."""
    max_pending_body_bytes: Annotated[int, Meta(ge=65_536)] = 64 * 1_048_576
    """Bytes of unfinished request bodies held at once, all connections together (memory or
    spooled); the body that would pass it gets 503 (Retry-After) and its connection closes."""

    # --- Models -----------------------------------------------------------------------------
    models: tuple[str, ...] = ("chatterbox",)
    """Model families to load: chatterbox, chatterbox-turbo, chatterbox-multilingual (comma
    separated). Each costs its load time and memory; see docs/models.md."""
    model_aliases: tuple[str, ...] = ()
    """Extra or changed model names, as alias=family entries (e.g. tts-1=chatterbox). Defaults:
    tts-1 -> turbo, tts-1-hd -> chatterbox, gpt-4o-mini-tts -> multilingual, each when loaded."""

    # --- Engine and weights -----------------------------------------------------------------
    engine: Literal["auto", "reference", "vllm", "fake"] = "auto"
    """auto: vllm when CUDA and vLLM are importable, else reference."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    load_format: Literal["hub", "local", "dummy"] = "hub"
    """hub: download from the Hugging Face Hub; local: read ``model_path``; dummy: the real
    architecture with random weights (tests, benchmarks, machines without the Hub)."""
    model_path: str | None = None
    """--load-format local: the chatterbox (original) checkpoint directory."""
    turbo_model_path: str | None = None
    """--load-format local: the chatterbox-turbo checkpoint directory."""
    multilingual_model_path: str | None = None
    """--load-format local: the chatterbox-multilingual files (default: ``model_path``, as on
    the Hub both live in one repository)."""
    hf_repo: str = DEFAULT_HF_REPO
    """The original model's Hub repository (the other families' are pinned in the registry)."""
    hf_revision: str = DEFAULT_HF_REVISION
    """Hub revision (commit) of the weights: pinned, never a moving branch."""
    cache_dir: str = msgspec.field(default_factory=_default_cache_dir)
    """Weights (hub downloads) and computed voice conditionals live under here."""
    dummy_seed: int = 0
    """Seed of the random weights (with load_format dummy)."""
    watermark: bool = True
    """Apply the Perth imperceptible watermark to every output (as upstream does)."""
    watermark_batch: bool = True
    """vLLM engine: watermark every stream's windows in one batched pass (the same audio as
    upstream's call per window; docs/operations.md). Off: one upstream call per window on a
    worker thread, as until 2026-12-04 (an A/B lever until a GPU has measured both)."""
    watermark_stream: Literal["default", "own", "high"] = "default"
    """With ``watermark_batch`` on a GPU: the CUDA stream the watermark pass runs on.
    ``default``: the default stream, which is the vocoder's unless ``vocoder_stream_priority``
    gives the vocoder one of its own (on the vocoder's, its host reads wait for the vocoder
    batch queued before them; apart from it, its kernels run after the vocoder's waiting ones).
    ``own``: a stream of its own; ``high``: of its own at high priority (its kernels go before
    the vocoder's waiting ones). Every served run with a stream of its own has ended in an
    illegal memory access on an H200 so far (docs/operations.md): an option to measure, not
    the default."""
    watermark_first_apart: bool = False
    """With ``watermark_batch``: a stream's first window (its first audio waits for it) goes in
    a pass of first windows only, ahead of the other windows taken from the queue with it,
    instead of in one pass over all of them (under load seconds of other streams' audio). The
    audio does not change; it costs one more pass (one more wait for the device) whenever both
    kinds are queued. Off until a GPU run weighs the two (docs/operations.md)."""

    watermark_resample: Literal["soxr", "device"] = "soxr"
    """With ``watermark_batch``: where a pass resamples its windows to Perth's 32 kHz and back.
    ``soxr``: upstream's (``librosa.resample``) on host threads, the same samples as upstream's
    call; ``device``: a kaiser_best windowed-sinc resampler on the watermark's device, no host
    audio work in a pass (67.8 dB from soxr's path on a real voice, the watermark detected in
    every frame on both; docs/operations.md). Not yet timed on a GPU."""

    # --- Generation bounds ------------------------------------------------------------------
    max_speech_tokens: PositiveInt = 1000
    """Most speech tokens T3 may generate for one text chunk (25 tokens = 1 s of audio)."""
    flow_steps: Annotated[int, Meta(ge=1, le=50)] = 10
    """Euler steps of the S3Gen flow-matching decoder."""
    max_chunk_chars: Annotated[int, Meta(ge=20)] = 300
    """Input text is split at sentence/clause boundaries into chunks of at most this size."""

    # --- Voices -----------------------------------------------------------------------------
    voices_dir: str | None = None
    """User voices: clips dropped here (and voices created through the API) are voices.
    Default: ``<cache_dir>/voices``."""
    builtin_voices_dir: str | None = None
    """Built-in voice manifest and clips. Default: the ``voices/`` folder shipped with us."""
    voice_cache_size: PositiveInt = 64
    """Voice conditionals kept in memory (LRU); all are also kept on disk."""
    max_created_voices: Annotated[int, Meta(ge=0)] = 1000
    """Voices that may be created through the API (400 ``too_many_voices`` beyond)."""
    max_consent_chars: PositiveInt = 1024
    """Longest ``consent`` text stored with a created voice."""
    upload_decode_memory_bytes: Annotated[int, Meta(ge=256 * 1_048_576)] = 1024 * 1_048_576
    """Address space the child process decoding an upload may map (RLIMIT_AS, enforced by the
    OS; Python and PyAV need ~130 MiB of it to start)."""
    upload_decode_cpu_s: PositiveInt = 10
    """CPU seconds one upload's decoding child may use (RLIMIT_CPU)."""
    upload_decode_timeout_s: Annotated[float, Meta(gt=0.0)] = 15.0
    """Wall time one upload's decoding child may take before it is killed."""
    upload_min_sample_rate: PositiveInt = 8_000
    """Lowest sample rate an uploaded clip's stream may declare or any of its frames may have
    (checked before resampling)."""
    upload_max_sample_rate: PositiveInt = 192_000
    """Highest sample rate an uploaded clip's stream or frames may have."""
    upload_max_channels: PositiveInt = 8
    """Most channels an uploaded clip's stream or frames may have."""

    # --- Audio -----------------------------------------------------------------------------
    audio_encoder: Literal["auto", "inprocess", "ffmpeg"] = "auto"
    """How mp3/opus/aac/flac (and wav/pcm at speed != 1) are encoded. inprocess: FFmpeg's
    libraries through PyAV in a worker thread (1-5 ms to the first bytes); ffmpeg: one FFmpeg
    process per request (~13-90 ms to the first bytes, ~3 ms less CPU per audio-second for
    mp3); auto: inprocess when PyAV imports."""

    # --- Admission and time limits ----------------------------------------------------------
    max_in_flight: PositiveInt = 32
    """Requests synthesising at once; more wait in the queue."""
    max_queued: Annotated[int, Meta(ge=0)] = 64
    """Requests waiting for a slot; past this, 429 at once."""
    queue_timeout_s: NonNegativeFloat = 30.0
    """Longest a speech request waits in the queue for a slot before a 503 (seconds)."""
    request_timeout_s: NonNegativeFloat = 600.0
    """Longest a request may take in all, from its headers to its last byte sent (seconds),
    whatever the format: the engine, the encoder and a client reading slowly all count; 504
    before the first byte, the stream closed after."""
    shutdown_grace_s: NonNegativeFloat = 10.0
    """On SIGTERM/SIGINT: how long open requests may take in total (seconds); what still runs
    then is cancelled."""

    # --- Isolation between clients and keys (docs/operations.md, "Fair shares") ------------
    max_client_share: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.25
    """Largest share of the admission budget one client (an IP address; IPv6: its /64) may
    hold: ceil(share x max_in_flight) requests synthesising and ceil(share x max_queued)
    waiting; more of its requests wait for its own to finish, past that 429
    ``client_concurrency_limit``. 1: no per-client limit."""
    max_key_share: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.5
    """The same share per API key, applied when two or more keys are configured (one key has
    no one to share with); 429 ``key_concurrency_limit``. 1: no per-key limit."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks (comma separated, e.g. 127.0.0.1,10.0.0.0/8) of reverse proxies
    whose X-Forwarded-For names the client. Empty: the peer address is the client and
    X-Forwarded-For is ignored."""
    admin_api_keys: tuple[str, ...] = ()
    """Keys (comma separated) that are accepted like ``api_keys`` and also see, use and
    delete every voice, whoever created it."""

    # --- Cluster mode (Ray Serve; the `cluster` extra) -----------------------------------
    cluster: str | None = None
    """Run the engine tier as Ray Serve replicas: "local" starts a Ray instance on this
    machine, "auto" joins the Ray cluster this node belongs to, any other value is a Ray
    address (host:port). Unset: the engine runs in this process."""
    cluster_app_name: str = "chatterbox-engine"
    """The Serve application that holds the engine replicas (shared by every HTTP process)."""
    cluster_deploy: bool = True
    """Deploy the engine application when the cluster has none of that name (else attach to
    it as it is); off: only attach (to one from serve deploy or a RayService) and wait."""
    cluster_min_replicas: Annotated[int, Meta(ge=0)] = 1
    """Fewest engine replicas (0 lets autoscaling stop them all when idle)."""
    cluster_max_replicas: PositiveInt = 1
    """Most engine replicas; above cluster_min_replicas turns on autoscaling on ongoing requests."""
    cluster_replica_gpus: Annotated[float, Meta(ge=0.0)] | None = None
    """GPUs per engine replica. Default: 1 for the vllm engine or device cuda, else 0."""
    cluster_replica_cpus: Annotated[float, Meta(ge=0.0)] = 1.0
    """CPUs Ray reserves for each engine replica."""
    cluster_max_ongoing_requests: Annotated[int, Meta(ge=0)] = 0
    """Requests one replica takes at once (more wait in the router). 0: from the engine's
    batch bounds (vllm: vllm_max_num_seqs; reference: 2; fake: max_in_flight)."""
    cluster_max_queued_requests: PositiveInt = 64
    """Requests this HTTP process lets wait for a replica slot; past it, 429 at once."""
    cluster_health_period_s: Annotated[float, Meta(gt=0.0)] = 5.0
    """How often Ray checks each replica (a replica failing it is replaced)."""
    cluster_loopback_only: bool = True
    """With cluster=local: the Ray instance started here (GCS, raylet, workers, object
    manager, dashboard agent) listens on 127.0.0.1 only. Off: on this machine's address, so
    that other machines can join it (keep such a cluster on a private network)."""

    # --- vLLM engine ------------------------------------------------------------------------
    vllm_max_num_seqs: PositiveInt = 128
    """vLLM: most sequences decoded in one batch."""
    vllm_max_model_len: PositiveInt = 2048
    """vLLM: longest sequence (prompt and speech tokens)."""
    vllm_max_num_batched_tokens: Annotated[int, Meta(ge=0)] = 0
    """vLLM: most tokens one engine step takes, prompt chunks and decodes together (its
    ``max_num_batched_tokens``). 0: vLLM's default for an engine it does not serve itself
    (2048 in vLLM 0.24; its own API server takes 8192 on an H100/H200). More lets a burst of
    new requests prefill in fewer steps, each step then longer for the streams decoding.
    docs/operations.md."""
    vllm_gpu_memory_utilization: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.5
    """vLLM: share of GPU memory its engine may use (weights and KV cache); with several
    families loaded, all their engines together (their KV caches split equally)."""
    vllm_kv_cache_memory_bytes: Annotated[int, Meta(ge=0)] = 0
    """If non-zero, the exact KV cache size (overrides gpu_memory_utilization); with several
    families loaded, the size of all their KV caches together (split equally)."""
    vllm_enforce_eager: bool = False
    """vLLM: no CUDA graphs (slower, starts faster, less memory)."""
    vllm_penalty: Literal["sampler", "resident", "fused"] = "fused"
    """Where T3's sampling is done: ``fused`` (the default), our logits processor doing the
    penalty, temperature, min-p, top-k, top-p and the draw itself on the GPU in one Triton
    launch, in upstream's order for the family (no host copy a step), vLLM only the argmax,
    for unseeded random draws (seeded and greedy requests stay vLLM's); ``sampler``, vLLM's
    own path (rebuilds every row's prompt and output ids on the host each step; Turbo's
    penalty before its filters, where upstream puts it after); ``resident``, our processor
    keeping each row's seen ids on the GPU and vLLM drawing. Measured on H100s (2026-12-07):
    T3's served step 1.71 / 6.56 ms at 1 / 128 rows (original) and 1.89 / 8.28 at 1 / 256
    (Turbo) with ``fused``, against 3.35 / 9.59 and 2.48 / 17.43 with ``sampler``.
    docs/operations.md."""
    vllm_engine_core: Literal["process", "thread"] = "process"
    """Where vLLM's engine core runs: ``process``, a process of its own (AsyncLLM, as vLLM
    serves); ``thread``, a thread of this process, so that T3 and the vocoder share one CUDA
    context and their kernels can run side by side instead of time-sliced (one model only;
    its host work then shares this process's GIL). docs/operations.md."""
    vllm_engine_stream_priority: Literal["normal", "high"] = "normal"
    """With ``vllm_engine_core = "thread"``: the priority of the CUDA stream T3's engine thread
    runs on. ``high``: the GPU schedules T3's waiting kernels before the vocoder's (on the
    default, lowest-priority stream), so a decode step need not queue behind a vocoder batch;
    the vocoder takes what T3 leaves. docs/operations.md."""
    vllm_kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    """T3's KV cache in vLLM: auto (the model's bf16) or fp8 (e4m3, unit scales: half the bytes a
    token, so T3's decode steps read half as much, the step that bounds it at 128 streams, and
    twice the tokens fit). fp8 rounds every key and value (3 mantissa bits): T3's tokens can
    differ from bf16's, which only real weights can judge (docs/operations.md). Needs vLLM's
    FlashAttention 3 on an H100/H200 (vLLM picks another backend or refuses elsewhere)."""
    vllm_cascade_attention: bool = False
    """vLLM's cascade attention (its ``disable_cascade_attn`` false): when every running
    request shares a prompt prefix of at least 256 tokens in the prefix cache (one voice's
    conditioning: Turbo's is ~375 tokens; the CFG families' ~150 are too short) and at least
    8 decode, the prefix's keys and values are read once per step for all of them instead of
    once per request. At 256 Turbo rows attention is 71% of a decode step's GPU time (H100,
    2026-12-05). The same function, other roundings (two kernels merged by log-sum-exp); such
    steps run outside vLLM's full CUDA graphs (piecewise). docs/operations.md."""
    vocoder_stream_priority: Literal["default", "high"] = "default"
    """With ``vllm_engine_core = "thread"``: the CUDA stream the vocoder's batches run on.
    ``default``: the default stream. ``high``: a high-priority stream of its own, so that the
    GPU schedules the vocoder's waiting kernels before T3's: at one stream the first window's
    CFM took 68.9 ms in the server beside T3 decoding the same request's next tokens, 42.1
    alone (H100, 2026-12-05); under load T3 then gets what the vocoder leaves (the opposite
    of ``vllm_engine_stream_priority high``; the two together are refused). docs/operations.md."""
    vocoder_sms: Annotated[int, Meta(ge=0, le=4096)] = 0
    """With ``vllm_engine_core = "thread"``: the vocoder's batches run on a CUDA green context
    of this many SMs (the driver rounds up to its granularity, 8 on an H100 of 132), so the
    rest of the card is never taken by the vocoder's blocks and T3's decode kernels (which
    may run anywhere) always find SMs free. Kernels are not pre-empted: under load T3's
    small kernels otherwise wait behind the vocoder's long ones (T3 at ~50 ms a step in the
    server against 10.6 alone at 128 rows, H100, 2026-12-05). 0: the whole card. Needs
    PyTorch built with green contexts and a CUDA 12.8+ driver. docs/operations.md."""
    vocoder_first_window_lane_rows: Annotated[int, Meta(ge=0, le=64)] = 0
    """Streams' first windows run in a vocoder lane of their own: a second worker thread on a
    high-priority CUDA stream with its own CUDA graphs (first-window widths only), batches of
    at most this many rows, beside the main lane's batches instead of queued behind them (a
    new stream at 32 streams waited for up to two batches of ~10 regular windows, p95 first
    audio 1.1-1.8 s on an H100, 2026-12-05). The audio is the same (same noise, same
    solve). Costs the lane's graphs' memory and capture time. 0: one lane. docs/operations.md."""
    t3_first_window_pause_ms: Annotated[float, Meta(ge=0.0, le=1000.0)] = 0.0
    """With ``vllm_engine_core = "thread"``: T3 takes no step while a vocoder batch with a
    first window runs on the GPU, for at most this long, when no stream T3 decodes for would
    feel it (each waits for its first window's audio or has over a second of audio ahead of its
    listener beyond the pause). At one stream the first window's CFM took 67 ms beside T3's
    decoding, 42 ms alone (H100, 2026-12-05). 0: never. docs/operations.md."""
    cuda_memory_snapshots: str = ""
    """A directory: record every CUDA allocation's Python stack from startup and, on SIGUSR2,
    write the allocator's live blocks with their stacks there (``python -m
    gateway.tools.loadtest --cuda-snapshots``; gateway.observability.cuda_memory). A debugging
    aid that costs host CPU per allocation; empty: off. CUDA only."""
    gil_switch_interval_ms: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    """How long a thread of this process may hold the GIL while another waits for it
    (Python's ``sys.setswitchinterval``; 0: Python's own, 5 ms). With ``vllm_engine_core =
    "thread"`` the engine thread gives the GIL up at every wait for the GPU and then waits up
    to this long for it back while the event loop or the vocoder's thread runs Python: at 256
    Turbo streams it ran only 40% of the time with the GIL free half of it (H100, 2026-12-05).
    Shorter: sooner back, more switches. docs/operations.md."""
    vllm_stream_interval: Annotated[int, Meta(ge=1, le=64)] = 1
    """T3's tokens reach this process from vLLM in groups of at most this many (a request's
    first token and its last always at once; vLLM's ``stream_interval``), each group ending
    where the stream's next vocoder window becomes due, so no window waits for a group to
    fill. Every group is one ``RequestOutput`` per stream per step on this process's event
    loop: at hundreds of streams groups of N cut that host work ~N times. 1: every token at
    once. docs/operations.md."""
    vocoder_max_batch: PositiveInt = 64
    """Most token windows one batched S3Gen call vocodes."""
    vocoder_max_later_wait_s: Annotated[float, Meta(ge=0.0, le=60.0)] = 0.5
    """First windows go ahead of later ones (time to first audio), but a later window that
    has waited this long joins them: streams already playing cannot starve under load."""
    vocoder_first_apart: bool = False
    """A batch that carries a stream's small first window takes only first windows (and later
    windows whose listener would go silent before the next batch); the other later windows go
    in the next batch (none starves: its listener's audio runs down until it is urgent).
    Under load a new stream's first window otherwise rides a batch of ~30 regular windows (a
    ~530 ms solve on an H100 at 32 streams, against ~50 ms alone): apart, its first byte waits
    for a small solve, and the card pays one more batch per group of first windows. Audio
    unchanged. Off until a GPU run weighs it (docs/operations.md)."""
    vocoder_first_window_preempt: bool = False
    """With ``vocoder_first_window_lane_rows``: the main loop queues each batch's CFM solve one
    Euler step at a time, at most two steps ahead of the device, and its next steps wait (on
    the device) for a first-window batch the lane launched meanwhile. A new stream's first
    window then shares the card with at most two steps of a regular batch (~50 ms each at 30
    rows on an H100) instead of running beside the whole batch (~530 ms), and has it to
    itself after them. Audio unchanged; the regular batch ends later by the first windows'
    time. Off until a GPU run weighs it (docs/operations.md)."""
    vocoder_unhealthy_after_failures: Annotated[int, Meta(ge=1, le=1000)] = 3
    """Vocoder batches failed in a row after which the engine reports itself not ready (a
    sticky GPU fault fails every batch); one success resets the count."""
    gpu_serial_debug: bool = False
    """Diagnostics for a device fault: the vocoder's batches (each part of one) and the
    watermark's passes run one at a time on the GPU, each ending with a synchronisation, so
    a CUDA error is raised and logged by the part that caused it (``device fault in vocoder:
    CFM``). Much slower: for chasing a fault, never for serving."""
    vocoder_cuda_graphs: bool = True
    """Capture S3Gen as CUDA graphs at start (GPU only): the whole CFM solve and the flow
    encoder per bucketed (rows, frames) shape, HiFT per (rows, mel frames) of the windows the
    stream policy makes; other shapes (final windows, one-shot rows) run eager."""
    vocoder_graph_max_frames: Annotated[int, Meta(ge=64, le=8192)] = 1536
    """Widest flow input (mel frames, voice prompt included: 2 per token) captured as a
    CUDA graph; each bucket's graph memory is shared, start time grows with the count."""
    stream_first_window_tokens: PositiveInt = 20
    """Speech tokens in a stream's first vocoded window (small: fast first byte)."""
    stream_window_tokens: PositiveInt = 50
    """Speech tokens in the second window."""
    stream_max_window_tokens: PositiveInt = 200
    """Later windows double from ``stream_window_tokens`` up to this, and a stream with
    tokens already waiting takes up to this many at once: every window re-runs the vocoder's
    flow over the voice prompt, so fewer windows per utterance mean more audio per second."""
    vocoder_split_min_rows: Annotated[int, Meta(ge=0, le=4096)] = 8
    """A vocoder batch whose rows need very different flow widths (small first windows beside
    whole utterances) is solved as several CFM solves by width instead of every row at the
    widest row's width. Eager solves (no CUDA graph holds them, as on the CPU): groups of at
    least this many rows. With CUDA graphs a cost search over the graphs' padded shapes decides
    where a split pays. 0: never split by width (with graphs, runs are still cut to fit the
    graphs' row counts). Rows are independent in a solve: the audio does not change."""
    stream_final_window_tokens: Annotated[int, Meta(ge=0, le=100_000)] = 0
    """Once T3 has finished a stream, what is left is vocoded as one final window when at most
    this many tokens remain (0: twice ``stream_max_window_tokens``), else in windows of that
    size until it fits: under load T3 runs far ahead of the vocoder, and each window saved is
    one flow pass over the voice prompt saved. A stream's first window is small (its first
    byte waits for it) unless T3 finished the stream before the vocoder got to it: then it is
    the whole utterance when that fits this limit."""

    stream_early_window_s: Annotated[float, Meta(ge=0.0, le=10.0)] = 0.0
    """A stream's later window that waits for T3's tokens goes with those T3 has made (the
    largest of a few sizes they fill: multiples of ``stream_first_window_tokens`` below
    ``stream_window_tokens``, then multiples of that) once the stream's listener, playing
    from its first audio in real time, has less than this many seconds of audio left beyond
    the vocoder's recent window latency, while T3 makes the stream's audio at least 1.25x
    faster than real time (else, the card overloaded, smaller windows would only cost more
    flow work). At 32 streams every stream's listener otherwise waits after its first
    window (0.48 s of audio; the 50-token second window waits ~0.9 s for T3). More windows,
    more flow work per audio-second. 0: off. docs/operations.md."""

    vocoder_fill_graphs: bool = False
    """A stream's later window takes, of the tokens T3 has already made beyond it, those that
    fit the CUDA graph width its flow solve is padded to anyway (a 200-token window of a 10 s
    voice prompt: 926 flow frames in a 1024-frame graph, room for 49 more tokens): more audio
    from the same solve, fewer windows (each re-runs the flow over the voice prompt). First
    and final windows are unchanged; such windows' HiFT runs outside the captured graphs
    (their lengths vary). Off (the default until a GPU run weighs it): windows are the
    schedule's sizes. docs/operations.md."""

    stream_first_window_grow_after_s: Annotated[float, Meta(ge=0.0, le=60.0)] = 0.0
    """A stream's first window still waiting for the vocoder after this many seconds takes
    the tokens T3 has made meanwhile (in steps of ``stream_window_tokens``, up to the cap)
    instead of the small first window: under load (the vocoder behind, first audio seconds
    away anyway) each stream then costs fewer windows, each of which re-runs the flow over the
    voice prompt; a first window the vocoder takes at once stays small. 0: off."""

    # --- Speed: measured trade-offs and measurement aids (docs/operations.md, "Speed knobs") -
    vocoder_compile: VocoderCompile = "off"
    """Compile the CFM estimator's blocks with torch.compile (inductor) inside the captured
    CUDA graphs: dynamic: one compile for every shape; static: one per graph bucket (slower
    start, warm caches help); rows: one per row count, the frame width symbolic (a start
    between the two). Falls back to the plain blocks, with a warning, if compiling fails."""
    vocoder_attention: Literal["sdpa", "varlen", "auto"] = "auto"
    """The CFM estimator's attention: sdpa (upstream's key-padding bias through SDPA), varlen
    (FlashAttention's variable-length kernel, each row's queries over its real keys: the same
    function, no work on padded keys or rows; CUDA with a bf16/fp16 flow only, else sdpa with a
    warning) or auto, the default (varlen where it runs, sdpa elsewhere without a warning)."""
    vocoder_hift_kernels: Literal["upstream", "fused"] = "upstream"
    """HiFT's elementwise work: upstream (its modules as they are: each convolution's weight
    norm recomputed every call, each Snake activation five full-tensor kernels) or fused (a
    copy of HiFT with the weight norms folded once and each Snake one Triton kernel: the same
    arithmetic, ~1 ulp apart where a product and sum contract; gateway/engine/vllm/hift_kernels.py).
    Not yet timed on a GPU (docs/operations.md)."""
    vocoder_first_window_flow_steps: Annotated[int, Meta(ge=0, le=50)] = 0
    """Euler steps of a stream's first window only (0: flow_steps, as upstream): fewer steps
    make the first byte sooner and change that window's audio (docs/operations.md)."""
    vocoder_prompt_tokens: Annotated[int, Meta(ge=0)] = 0
    """Voice-prompt tokens the flow sees per window, the last ones of the voice's prompt (0:
    all of them, up to 10 s as upstream). Fewer cost less per window and change the audio."""
    fixed_speech_tokens: bool = False
    """Benchmarks on dummy weights only: T3 never stops before max_speech_tokens (random weights
    sample the stop token at random), so runs are comparable and each stream's length is known."""
    request_timeline: bool = False
    """Honour the ``X-Timeline: 1`` request header: that speech request's log line carries the
    milliseconds of every stage up to its first byte (``python -m gateway.tools.benchmark
    --stages timeline``). Off: the header is ignored and nothing is recorded."""

    # --- ElevenLabs-compatible face (voice agents; docs/voice-agents.md) ---------------------
    elevenlabs_enabled: bool = True
    """Serve ElevenLabs' text-to-speech routes, voices and stream-input WebSockets next to
    OpenAI's, on the same engine, voices, keys and admission slots."""
    elevenlabs_model_aliases: tuple[str, ...] = ()
    """Extra or changed ElevenLabs model ids, as id=family entries (e.g.
    eleven_flash_v2_5=chatterbox); the defaults map flash/turbo ids to chatterbox-turbo,
    multilingual and v3 ids to chatterbox-multilingual, other eleven_* ids to chatterbox."""
    elevenlabs_max_sockets: PositiveInt = 256
    """Text-to-speech WebSockets open at once (more are refused with 503). Each counts against
    max_connections too; each text chunk being spoken holds an admission slot like a request."""
    elevenlabs_max_contexts: PositiveInt = 10
    """Contexts open at once on one multi-stream-input socket (past it: error, close 1008)."""
    elevenlabs_max_message_bytes: Annotated[int, Meta(ge=1024)] = 65_536
    """Largest WebSocket message a client may send (larger: closed with 1009 by the server's
    WebSocket layer before it is buffered)."""
    elevenlabs_max_buffered_chars: Annotated[int, Meta(ge=500)] = 20_000
    """Text one context may hold that is not spoken yet, buffered or queued (past it: error,
    close 1008): about 20 minutes of speech."""
    elevenlabs_inactivity_timeout_s: Annotated[float, Meta(gt=0.0)] = 20.0
    """A socket that receives no message and sends no audio for this long is closed (error
    input_timeout_exceeded, 1008); a client may ask for another value with ?inactivity_timeout."""
    elevenlabs_max_inactivity_timeout_s: Annotated[float, Meta(gt=0.0)] = 300.0
    """The largest inactivity_timeout a client may ask for (larger values are lowered to it)."""
    elevenlabs_max_socket_s: Annotated[float, Meta(gt=0.0)] = 3600.0
    """Longest a text-to-speech WebSocket may stay open, however busy (then closed, 1008)."""

    # --- vLLM engine: several model families on one GPU -----------------------------------
    vllm_parallel_start: bool = True
    """Start the loaded families' vLLM engines side by side (each compiles in a process of its
    own) while this process loads their modules; off: one after another."""

    def __post_init__(self) -> None:
        from gateway.models.families import FAMILIES
        from gateway.speech.model_names import parse_alias_overrides

        if not self.models:
            raise ValueError("models must name at least one model family")
        unknown = [name for name in self.models if name not in FAMILIES]
        if unknown or len(set(self.models)) != len(self.models):
            raise ValueError(
                f"models {','.join(self.models)!r}: each of {', '.join(FAMILIES)} at most once"
            )
        parse_alias_overrides(self.model_aliases, self.models)
        for proxy in self.trusted_proxies:
            _network(proxy)
        parse_alias_overrides(self.elevenlabs_model_aliases, self.models)
        if self.vllm_engine_core == "thread" and len(self.models) > 1:
            raise ValueError(
                "vllm_engine_core thread serves one model (vLLM keeps one engine state per process); "
                f"models names {len(self.models)}: use vllm_engine_core process, or load one model"
            )
        if self.vllm_engine_stream_priority != "normal" and self.vllm_engine_core != "thread":
            raise ValueError(
                "vllm_engine_stream_priority orders T3's kernels against the vocoder's in one CUDA context: it needs "
                "vllm_engine_core thread (an engine core process is a context of its own, which the GPU time-slices)"
            )
        if self.vocoder_stream_priority != "default" and self.vllm_engine_core != "thread":
            raise ValueError(
                "vocoder_stream_priority orders the vocoder's kernels against T3's in one CUDA context: it needs "
                "vllm_engine_core thread (an engine core process is a context of its own, which the GPU time-slices)"
            )
        if self.vocoder_sms > 0 and self.vllm_engine_core != "thread":
            raise ValueError(
                "vocoder_sms partitions the GPU between T3 and the vocoder in one CUDA context: it needs "
                "vllm_engine_core thread (an engine core process is a context of its own, which the GPU time-slices)"
            )
        if self.vocoder_sms > 0 and self.vocoder_stream_priority != "default":
            raise ValueError(
                "vocoder_sms runs the vocoder on its green context's own stream, which has no priority to set: "
                "use one of vocoder_sms and vocoder_stream_priority"
            )
        # (the vocoder's own stream, by either setting, already needs vllm_engine_core thread: above)
        if self.watermark_stream != "default" and self.vocoder_stream_priority == "default" and self.vocoder_sms == 0:
            raise ValueError(
                f"watermark_stream {self.watermark_stream} runs the watermark pass on a CUDA stream of its own, which "
                "ended in an illegal memory access whenever vLLM's engine core was a process and the vocoder used the "
                "default stream (H200 2026-12-04 and -05, H100 2026-12-06); it has run clean only with "
                "vllm_engine_core thread and the vocoder on a stream of its own (vocoder_stream_priority high or "
                "vocoder_sms): set those, or watermark_stream default"
            )
        if self.vocoder_first_window_preempt and self.vocoder_first_window_lane_rows == 0:
            raise ValueError(
                "vocoder_first_window_preempt lets the first-window lane's batches go ahead of the main loop's: "
                "it needs vocoder_first_window_lane_rows > 0"
            )
        if self.vocoder_first_window_lane_rows > 0 and self.vocoder_compile != "off":
            raise ValueError(
                "vocoder_first_window_lane_rows runs two vocoder threads over one S3Gen: with vocoder_compile both "
                "would compile the estimator at once; use one of them"
            )
        if self.t3_first_window_pause_ms > 0 and self.vllm_engine_core != "thread":
            raise ValueError(
                "t3_first_window_pause_ms pauses T3's engine thread: it needs vllm_engine_core thread (an engine core "
                "process steps on its own)"
            )
        if self.vocoder_stream_priority == "high" and self.vllm_engine_stream_priority == "high":
            raise ValueError(
                "vocoder_stream_priority high and vllm_engine_stream_priority high together put both on one priority: "
                "choose which of T3 and the vocoder goes first"
            )
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("ssl_keyfile needs ssl_certfile (the certificate it belongs to)")
        if self.max_pending_body_bytes < max(self.max_body_bytes, self.max_upload_bytes):
            # a body that can never fit in the budget would always be refused
            raise ValueError(
                "max_pending_body_bytes must hold at least one largest body "
                f"(max_body_bytes and max_upload_bytes), got {self.max_pending_body_bytes}"
            )

    def resolved_voices_dir(self) -> Path:
        return Path(self.voices_dir) if self.voices_dir else Path(self.cache_dir) / "voices"

    def resolved_builtin_voices_dir(self) -> Path:
        if self.builtin_voices_dir:
            return Path(self.builtin_voices_dir)
        here = Path(__file__).resolve().parent
        for candidate in (here / "builtin_voices", here.parent / "voices"):
            if (candidate / "manifest.json").is_file():
                return candidate
        return here.parent / "voices"

    def all_api_keys(self) -> frozenset[str]:
        keys = {k for k in self.api_keys if k}
        if self.api_keys_file:
            text = Path(self.api_keys_file).read_text(encoding="utf-8")
            keys.update(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
        return frozenset(keys)


_TUPLE_FIELDS = {
    "api_keys",
    "cors_origins",
    "models",
    "model_aliases",
    "trusted_proxies",
    "admin_api_keys",
    "elevenlabs_model_aliases",
}


def env_overrides(environ: Mapping[str, str]) -> dict[str, object]:
    """The ``CHATTERBOX_*`` variables as raw field values (strings, lists for tuple fields)."""
    names = set(Settings.__struct_fields__)
    out: dict[str, object] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        field = key[len(ENV_PREFIX):].lower()
        if field not in names:
            continue
        out[field] = [v.strip() for v in value.split(",") if v.strip()] if field in _TUPLE_FIELDS else value
    return out


def _network(text: str) -> None:
    import ipaddress

    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"trusted_proxies: {text!r} is not an IP address or network") from None


class SettingsError(ValueError):
    """A setting has a value it cannot take; the message names the setting."""


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None
) -> Settings:
    """Environment first, then explicit overrides (CLI flags); both validated and typed."""
    raw: dict[str, object] = env_overrides(os.environ if environ is None else environ)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid setting: {exc}") from None
