"""What a server process on this machine holds, read from /proc: resident memory, the bytes of
temporary files it has open, its open descriptors. A thread samples them while an attack runs,
so a table can show the peak next to the value before and after."""

from __future__ import annotations

import os
import stat
import tempfile
import threading

from gateway.tools import host_probes

SAMPLE_INTERVAL_S = 0.1


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def temp_file_bytes(pid: int, temp_dir: str | None = None) -> int | None:
    """Bytes of the regular files under the temporary directory that ``pid`` has open, deleted
    ones included (a spooled upload is an unlinked file in /tmp)."""
    prefix = os.path.realpath(temp_dir or tempfile.gettempdir()) + os.sep
    total = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for name in names:
        path = f"/proc/{pid}/fd/{name}"
        try:
            target = os.readlink(path)
            if not target.startswith(prefix):
                continue
            info = os.stat(path)  # follows the descriptor, also to a deleted file
        except OSError:
            continue  # closed meanwhile
        if stat.S_ISREG(info.st_mode):
            total += info.st_size
    return total


class ServerWatch(threading.Thread):
    """Samples RSS and temporary-file bytes of ``pid`` until stopped; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.rss_before = host_probes.rss_bytes(pid)
        self.peak_rss = self.rss_before or 0
        self.temp_before = temp_file_bytes(pid) or 0  # what the process held before the attack
        self.peak_temp = self.temp_before
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_INTERVAL_S):
            self.peak_rss = max(self.peak_rss, host_probes.rss_bytes(self.pid) or 0)
            self.peak_temp = max(self.peak_temp, temp_file_bytes(self.pid) or 0)
