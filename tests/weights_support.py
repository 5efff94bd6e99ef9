"""Where the slow tests keep the dummy checkpoints they load: one folder the suite owns.

The end-to-end tests on real engines need dummy checkpoints of all three families (original
3.0 GB, Turbo 2.8 GB, Multilingual 3.0 GB, ~20-60 s each to write on 2 cores). They are
written once into ``<repository>/.cache/tests/dummy/`` (git ignores ``.cache/``) and reused
by every later run, never into the user's own cache (``~/.cache/chatterbox-gateway``) and
never once per run. Delete the folder to get the space back; ``CHATTERBOX_TEST_CACHE``
puts it elsewhere (a machine that keeps checkpoints in one place for several clones can
point it there: it is a cache directory whose ``dummy/`` holds them).

Each test still gets a cache directory of its own (voice conditionals, uploaded voices): only
its ``dummy/`` is the shared one, through a symbolic link.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE_ENV = "CHATTERBOX_TEST_CACHE"


def suite_cache_dir() -> Path:
    """The cache directory whose ``dummy/`` holds the suite's checkpoints."""
    return Path(os.environ.get(TEST_CACHE_ENV) or REPO / ".cache" / "tests").expanduser()


def cache_with_shared_weights(root: Path) -> str:
    """A new cache directory under ``root`` (for ``Settings.cache_dir``) whose dummy
    checkpoints are the suite's."""
    shared = suite_cache_dir() / "dummy"
    shared.mkdir(parents=True, exist_ok=True)
    cache = root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "dummy").symlink_to(shared, target_is_directory=True)
    return str(cache)
