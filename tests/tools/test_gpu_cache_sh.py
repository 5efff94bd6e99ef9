"""The compile caches between GPU visits (gateway/tools/gpu/cache.sh), with the real bash, tar,
xz and split: a pack larger than what one file back from a device call may be comes back in
parts that each fit, and those parts, carried again, unpack to the same files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

CACHE_SH = Path(__file__).resolve().parents[2] / "gateway" / "tools" / "gpu" / "cache.sh"
PART = 64 << 10


def _sh(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f"set -u; . {CACHE_SH}; {script}"], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "GPU_CACHE_PART_BYTES": str(PART),
                                                       "XZ_OPT": "-0", **env})


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".unpacked"}


def _cache(root: Path, blob_bytes: int) -> Path:
    (root / "inductor" / "ab").mkdir(parents=True)
    (root / "inductor" / "ab" / "kernel.py").write_bytes(os.urandom(blob_bytes))  # incompressible
    (root / "vllm").mkdir()
    (root / "vllm" / "cache_key").write_text("7793c91ed0\n")
    return root


def test_a_large_cache_comes_back_in_parts_that_fit_and_unpacks_whole(tmp_path: Path) -> None:
    src = _cache(tmp_path / "gpu-cache", 3 * PART + 1000)
    (src / ".unpacked").touch()  # the marker of an earlier unpack stays out of the pack
    out = tmp_path / "out"
    out.mkdir()
    packed = _sh(f"gpu_cache_pack {out}/compile-cache.tar.xz", tmp_path, GPU_CACHE=str(src))
    assert packed.returncode == 0, packed.stderr
    parts = sorted(out.iterdir())
    assert [p.name for p in parts] == [f"compile-cache.tar.xz.part{i}" for i in range(1, 5)]
    assert all(p.stat().st_size <= PART for p in parts)

    carried = tmp_path / "repo" / ".gpu"  # what a later visit carries
    carried.mkdir(parents=True)
    for p in parts:
        (carried / p.name).write_bytes(p.read_bytes())
    dest = tmp_path / "fresh-cache"
    unpacked = _sh(f"gpu_cache_unpack .gpu/compile-cache.tar.xz {dest}", carried.parent)
    assert unpacked.returncode == 0, unpacked.stderr
    assert _tree(dest) == _tree(src)
    assert (dest / ".unpacked").exists()

    # once per folder: a second source of env.sh in the same call leaves what is there alone
    (dest / "vllm" / "cache_key").write_text("grown since\n")
    assert _sh(f"gpu_cache_unpack .gpu/compile-cache.tar.xz {dest}", carried.parent).returncode == 0
    assert (dest / "vllm" / "cache_key").read_text() == "grown since\n"


def test_parts_join_in_numeric_order_beyond_nine(tmp_path: Path) -> None:
    src = _cache(tmp_path / "gpu-cache", 10 * PART)
    out = tmp_path / "out"
    out.mkdir()
    assert _sh(f"gpu_cache_pack {out}/cc.tar.xz {src}", tmp_path).returncode == 0
    names = {p.name for p in out.iterdir()}
    assert "cc.tar.xz.part10" in names and "cc.tar.xz.part11" in names  # 'part10' sorts before 'part2' as text
    dest = tmp_path / "dest"
    result = _sh(f"gpu_cache_unpack {out}/cc.tar.xz {dest}", tmp_path)
    assert result.returncode == 0, result.stderr
    assert _tree(dest) == _tree(src)


def test_a_small_cache_is_one_file_and_a_repack_leaves_no_stale_parts(tmp_path: Path) -> None:
    src = _cache(tmp_path / "gpu-cache", 2 * PART)
    out = tmp_path / "out"
    out.mkdir()
    assert _sh(f"gpu_cache_pack {out}/cc.tar.xz {src}", tmp_path).returncode == 0
    assert len(list(out.iterdir())) == 3
    (src / "inductor" / "ab" / "kernel.py").write_bytes(b"small now")
    assert _sh(f"gpu_cache_pack {out}/cc.tar.xz {src}", tmp_path).returncode == 0
    assert [p.name for p in out.iterdir()] == ["cc.tar.xz"]
    dest = tmp_path / "dest"
    assert _sh(f"gpu_cache_unpack {out}/cc.tar.xz {dest}", tmp_path).returncode == 0
    assert _tree(dest) == _tree(src)


def test_nothing_carried_is_no_error_and_leaves_the_folder_to_fill(tmp_path: Path) -> None:
    dest = tmp_path / "gpu-cache"
    result = _sh(f"gpu_cache_unpack .gpu/compile-cache.tar.xz {dest}", tmp_path)
    assert result.returncode == 0, result.stderr
    assert dest.is_dir() and not any(dest.iterdir())


def test_a_damaged_part_fails_loudly(tmp_path: Path) -> None:
    src = _cache(tmp_path / "gpu-cache", 3 * PART)
    out = tmp_path / "out"
    out.mkdir()
    assert _sh(f"gpu_cache_pack {out}/cc.tar.xz {src}", tmp_path).returncode == 0
    (out / "cc.tar.xz.part2").unlink()  # a part not carried
    dest = tmp_path / "dest"
    result = _sh(f"gpu_cache_unpack {out}/cc.tar.xz {dest}", tmp_path)
    assert result.returncode != 0
    assert not (dest / ".unpacked").exists()
