"""Where the model weights come from: the Hugging Face Hub, a local directory, or dummy.

Every engine loads a *checkpoint directory* holding
:data:`~gateway.engine.checkpoint.layout.CHECKPOINT_FILES` (the layout of
``ResembleAI/chatterbox`` on the Hub). :func:`checkpoint_dir` gives that directory for any
``load_format``; dummy weights are written once into such a directory (see
:mod:`gateway.engine.checkpoint.dummy`) so that dummy mode runs the real loading code.

Hub access must never make start-up hang: a cached snapshot is found offline, and when one is
missing a single short request tells whether the Hub is reachable at all before the download
(with its own retries and progress bars) starts. Without the Hub we fail in seconds with a
message saying what to do.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gateway.engine.checkpoint.dummy import materialize_dummy_checkpoint
from gateway.engine.checkpoint.layout import CHECKPOINT_FILES, WHAT_TO_DO, validate_checkpoint_dir
from gateway.errors import WeightsUnavailableError
from gateway.settings import Settings

HUB_PROBE_TIMEOUT_S = 10.0
"""One request, no retries, to learn whether the Hub answers before a download starts."""
HUB_ETAG_TIMEOUT_S = 10.0

def hub_cache_dir(settings: Settings) -> Path:
    """The Hugging Face cache we download into (inside our own cache directory)."""
    return Path(settings.cache_dir) / "hub"


def resolve_weights(settings: Settings) -> Path | None:
    """The checkpoint directory for hub/local weights, downloading if needed; None for dummy.

    Raises :class:`WeightsUnavailableError` (with what to do) when the weights cannot be had.
    Dummy weights are materialised later by the engine (:func:`checkpoint_dir`), because writing
    them takes a while and needs the model code.
    """
    if settings.load_format == "dummy":
        return None
    if settings.load_format == "local":
        if not settings.model_path:
            raise WeightsUnavailableError("--load-format local needs --model-path DIR. " + WHAT_TO_DO)
        return validate_checkpoint_dir(Path(settings.model_path))
    cached = cached_snapshot(settings)
    if cached is not None:
        return cached
    return _download(settings)


def download_weights(settings: Settings) -> Path:
    """Fetch ``hf_repo@hf_revision`` into the cache with progress bars; the snapshot directory.

    Used by ``chatterbox-gateway download``: works whatever ``load_format`` says.
    """
    return cached_snapshot(settings) or _download(settings)


def checkpoint_dir(settings: Settings) -> Path:
    """The directory to load for any ``load_format`` (dummy: written once, then reused)."""
    path = resolve_weights(settings)
    if path is not None:
        return path
    return materialize_dummy_checkpoint(settings)


def cached_snapshot(settings: Settings) -> Path | None:
    """The complete cached snapshot of ``hf_repo@hf_revision``, found without the network."""
    from huggingface_hub import try_to_load_from_cache

    folders = set()
    for name in CHECKPOINT_FILES:
        found = try_to_load_from_cache(
            settings.hf_repo, name, cache_dir=hub_cache_dir(settings), revision=settings.hf_revision
        )
        if not isinstance(found, str) or not Path(found).is_file():
            return None
        folders.add(Path(found).parent)
    return folders.pop() if len(folders) == 1 else None


def model_identity(settings: Settings) -> str:
    """A stable name for the weights (voice conditionals are cached under it).

    hub: ``repo@revision``; dummy: ``dummy-seed<N>``; local: the path plus a cheap fingerprint
    of the files (size, first and last MiB), so replacing the weights invalidates cached voices.
    """
    if settings.load_format == "dummy":
        return f"dummy-seed{settings.dummy_seed}"
    if settings.load_format == "hub":
        return f"{settings.hf_repo}@{settings.hf_revision}"
    path = Path(settings.model_path or ".").resolve()
    return f"local:{path}#{_fingerprint(path)}"


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        file = path / name
        if not file.is_file():
            digest.update(f"{name}:missing".encode())
            continue
        size = file.stat().st_size
        digest.update(f"{name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a value set since then too.
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _download(settings: Settings) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    where = f"{settings.hf_repo}@{settings.hf_revision}"
    if _offline():
        raise WeightsUnavailableError(
            f"the weights {where} are not in the cache {hub_cache_dir(settings)} and HF_HUB_OFFLINE "
            "forbids downloading them. " + WHAT_TO_DO
        )
    try:
        # snapshot_download retries a dead network for ~20 s; one bounded request decides first.
        HfApi().model_info(settings.hf_repo, revision=settings.hf_revision, timeout=HUB_PROBE_TIMEOUT_S)
        folder = snapshot_download(
            settings.hf_repo,
            revision=settings.hf_revision,
            cache_dir=hub_cache_dir(settings),
            allow_patterns=list(CHECKPOINT_FILES),
            etag_timeout=HUB_ETAG_TIMEOUT_S,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:  # gated repos included
        raise WeightsUnavailableError(f"the Hub has no {where} available to us ({_first_line(exc)}). " + WHAT_TO_DO) from None
    except Exception as exc:  # noqa: BLE001 - the HTTP client's errors differ across hub versions
        raise WeightsUnavailableError(
            f"cannot download {where} from the Hugging Face Hub ({type(exc).__name__}: {_first_line(exc)}). " + WHAT_TO_DO
        ) from None
    return validate_checkpoint_dir(Path(folder))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
