"""What crosses the tiers in place of voice conditionals: a reference to the clip.

Conditionals are engine objects (tensors on the replica's device) and stay on the engine
replicas. The HTTP tier's voice cache holds a :class:`ClipReference` instead: the clip's path on
the shared voice store (``None`` for the checkpoint's own voice). A replica turns it into
conditionals with its own :class:`~gateway.voices.cache.VoiceCache` over the shared cache
directory: memory, then the shared disk, then one computation for the whole cluster (a file
lock per voice, and the file renamed into place when complete).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gateway.voices.library import VoiceInfo


@dataclass(frozen=True, slots=True)
class ClipReference:
    clip: str | None
    """Absolute path of the reference clip on the shared voice store; None: the checkpoint voice."""
    sha: str | None = None
    """SHA-256 of the clip when the replica first computed its conditionals (diagnostics)."""

    def info(self, name: str) -> VoiceInfo:
        """A VoiceInfo for a replica's voice cache (which only reads ``clip`` and ``name``)."""
        return VoiceInfo(
            id=name,
            name=name,
            aliases=(),
            source="checkpoint" if self.clip is None else "user",
            clip=None if self.clip is None else Path(self.clip),
            created_at=None,
        )


def save_ref(ref: ClipReference, path: Path) -> None:
    Path(path).write_text(json.dumps({"clip": ref.clip, "sha": ref.sha}), encoding="utf-8")


def load_ref(path: Path) -> ClipReference:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    clip, sha = data["clip"], data.get("sha")
    if not (clip is None or isinstance(clip, str)) or not (sha is None or isinstance(sha, str)):
        raise ValueError(f"{path} is not a voice reference")
    return ClipReference(clip=clip, sha=sha)
