# Sourced by env.sh and families.sh: the compile caches (vLLM's, inductor's, Triton's) between
# visits. What comes back from a device call is at most 16 MiB a file, and the caches with the
# compiled CFM estimator's inductor artifacts pack to ~32 MiB xz (H100, 2026-12-07), so a pack
# over GPU_CACHE_PART_BYTES is split into DEST.part1, DEST.part2, ... Carry them back as
# .gpu/compile-cache.tar.xz (one file) or .gpu/compile-cache.tar.xz.partN (every part):
# gpu_cache_unpack takes either.
GPU_CACHE_PART_BYTES=${GPU_CACHE_PART_BYTES:-$((15 << 20))}

gpu_cache_pack() {  # gpu_cache_pack DEST.tar.xz [SRC_DIR, default $GPU_CACHE]: one file, or DEST.partN
  local dest=$1 src=${2:-$GPU_CACHE} size
  rm -f "$dest" "$dest".part*
  # xz on every core: inside a call's limit
  XZ_OPT=${XZ_OPT:--T0} tar --exclude=.unpacked -cJf "$dest" -C "$src" . 2>/dev/null || return 1
  size=$(stat -c %s "$dest")
  if [ "$size" -gt "$GPU_CACHE_PART_BYTES" ]; then
    split -b "$GPU_CACHE_PART_BYTES" -a 3 --numeric-suffixes=1 "$dest" "$dest.part" || return 1
    rm -f "$dest"
    local part n
    for part in "$dest".part[0-9][0-9][0-9]; do  # .part001 -> .part1, as families.py names them
      n=${part##*.part}
      mv "$part" "$dest.part$((10#$n))"
    done
  fi
  ls -la "$dest"*
}

gpu_cache_unpack() {  # gpu_cache_unpack BASE.tar.xz DEST_DIR: BASE or its parts, once per DEST_DIR
  local base=$1 dest=$2
  [ -e "$dest/.unpacked" ] && return 0
  mkdir -p "$dest"
  if [ -f "$base" ]; then
    tar -xJf "$base" -C "$dest" || return 1
  elif [ -f "$base.part1" ]; then
    # the parts in their numeric order (part10 after part9), joined as split cut them
    ls "$base".part* | sort -V | xargs cat | tar -xJf - -C "$dest" || return 1
  else
    return 0
  fi
  touch "$dest/.unpacked"
}
