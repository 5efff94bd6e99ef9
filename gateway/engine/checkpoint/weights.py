"""Where the model weights come from: the Hugging Face Hub, a local directory, or dummy.

Every engine loads, per model family, a *checkpoint directory* holding the family's
``checkpoint_files`` (the layout of its Hub repository; :data:`~gateway.engine.checkpoint.layout.CHECKPOINT_FILES` for the original). :func:`checkpoint_dir` gives that directory for any ``load_format``; dummy weights
are written once into such a directory (see :mod:`gateway.engine.checkpoint.dummy`) so that
dummy mode runs the real loading code. Hub: the original's repository and revision come from
the ``hf_repo``/``hf_revision`` settings, the other families' are pinned in the registry.

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
from gateway.engine.checkpoint.layout import WHAT_TO_DO, validate_checkpoint_dir
from gateway.errors import WeightsUnavailableError
from gateway.models.families import FAMILIES, MULTILINGUAL, ORIGINAL, TURBO, Family
from gateway.settings import Settings

_ORIGINAL = FAMILIES[ORIGINAL]

HUB_PROBE_TIMEOUT_S = 10.0
"""One request, no retries, to learn whether the Hub answers before a download starts."""
HUB_ETAG_TIMEOUT_S = 10.0

def hub_source(settings: Settings, family: Family) -> tuple[str, str]:
    """(repository, revision) of a family on the Hub."""
    if family.id == ORIGINAL:
        return settings.hf_repo, settings.hf_revision
    return family.hub_repo, family.hub_revision


def local_path(settings: Settings, family: Family) -> str | None:
    if family.id == TURBO:
        return settings.turbo_model_path
    if family.id == MULTILINGUAL:
        return settings.multilingual_model_path or settings.model_path
    return settings.model_path


def _flag(family: Family) -> str:
    return {TURBO: "--turbo-model-path", MULTILINGUAL: "--multilingual-model-path"}.get(family.id, "--model-path")


def hub_cache_dir(settings: Settings) -> Path:
    """The Hugging Face cache we download into (inside our own cache directory)."""
    return Path(settings.cache_dir) / "hub"


def resolve_weights(settings: Settings, family: Family = _ORIGINAL) -> Path | None:
    """One family's checkpoint directory for hub/local weights, downloading if needed; None for dummy.

    Raises :class:`WeightsUnavailableError` (with what to do) when the weights cannot be had.
    Dummy weights are materialised later by the engine (:func:`checkpoint_dir`), because writing
    them takes a while and needs the model code.
    """
    if settings.load_format == "dummy":
        return None
    if settings.load_format == "local":
        path = local_path(settings, family)
        if not path:
            raise WeightsUnavailableError(f"--load-format local needs {_flag(family)} DIR for {family.id}. " + WHAT_TO_DO)
        return validate_checkpoint_dir(Path(path), family)
    cached = cached_snapshot(settings, family)
    if cached is not None:
        return cached
    return _download(settings, family)


def download_weights(settings: Settings) -> list[Path]:
    """Fetch every loaded family's pinned snapshot into the cache with progress bars; the
    snapshot directories.

    Used by ``chatterbox-gateway download``: works whatever ``load_format`` says.
    """
    families = [FAMILIES[name] for name in settings.models]
    return [cached_snapshot(settings, family) or _download(settings, family) for family in families]


def checkpoint_dir(settings: Settings, family: Family = _ORIGINAL) -> Path:
    """The directory to load for any ``load_format`` (dummy: written once, then reused)."""
    path = resolve_weights(settings, family)
    if path is not None:
        return path
    return materialize_dummy_checkpoint(settings, family)


def cached_snapshot(settings: Settings, family: Family = _ORIGINAL) -> Path | None:
    """The complete cached snapshot of a family's pinned revision, found without the network."""
    from huggingface_hub import try_to_load_from_cache

    repo, revision = hub_source(settings, family)
    folders = set()
    for name in family.checkpoint_files:
        found = try_to_load_from_cache(repo, name, cache_dir=hub_cache_dir(settings), revision=revision)
        if not isinstance(found, str) or not Path(found).is_file():
            return None
        folders.add(Path(found).parent)
    return folders.pop() if len(folders) == 1 else None


def model_identity(settings: Settings, family: Family = _ORIGINAL) -> str:
    """A stable name for one family's weights (voice conditionals are cached under it).

    hub: ``repo@revision``; dummy: ``dummy-seed<N>``; local: the path plus a cheap fingerprint
    of the files (size, first and last MiB), so replacing the weights invalidates cached voices.
    Families other than the original get their id added where the name alone would be shared
    (dummy, and Multilingual in the original's repository).
    """
    suffix = "" if family.id == ORIGINAL else f"/{family.id}"
    if settings.load_format == "dummy":
        return f"dummy-seed{settings.dummy_seed}{suffix}"
    if settings.load_format == "hub":
        repo, revision = hub_source(settings, family)
        return f"{repo}@{revision}{suffix if family.hub_repo == _ORIGINAL.hub_repo else ''}"
    path = Path(local_path(settings, family) or ".").resolve()
    return f"local:{path}#{_fingerprint(path, family)}{suffix}"


def _fingerprint(path: Path, family: Family = _ORIGINAL) -> str:
    digest = hashlib.sha256()
    for name in family.checkpoint_files:
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


def _download(settings: Settings, family: Family = _ORIGINAL) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = hub_source(settings, family)
    where = f"{repo}@{revision}"
    if _offline():
        raise WeightsUnavailableError(
            f"the weights {where} are not in the cache {hub_cache_dir(settings)} and HF_HUB_OFFLINE "
            "forbids downloading them. " + WHAT_TO_DO
        )
    try:
        # snapshot_download retries a dead network for ~20 s; one bounded request decides first.
        HfApi().model_info(repo, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
        folder = snapshot_download(
            repo,
            revision=revision,
            cache_dir=hub_cache_dir(settings),
            allow_patterns=[*family.checkpoint_files, *family.optional_files],
            etag_timeout=HUB_ETAG_TIMEOUT_S,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:  # gated repos included
        raise WeightsUnavailableError(f"the Hub has no {where} available to us ({_first_line(exc)}). " + WHAT_TO_DO) from None
    except Exception as exc:  # noqa: BLE001 - the HTTP client's errors differ across hub versions
        raise WeightsUnavailableError(
            f"cannot download {where} from the Hugging Face Hub ({type(exc).__name__}: {_first_line(exc)}). " + WHAT_TO_DO
        ) from None
    return validate_checkpoint_dir(Path(folder), family)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
