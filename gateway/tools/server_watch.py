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


def temp_files(pid: int, temp_dir: str | None = None) -> dict[tuple[int, int], int] | None:
    """Size by (device, inode) of each regular file under the temporary directory that ``pid``
    has open, deleted ones included (a spooled upload is an unlinked file in /tmp)."""
    prefix = os.path.realpath(temp_dir or tempfile.gettempdir()) + os.sep
    files: dict[tuple[int, int], int] = {}
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
            files[(info.st_dev, info.st_ino)] = info.st_size
    return files


class ServerWatch(threading.Thread):
    """Samples RSS and temporary-file bytes of ``pid`` until stopped; keeps the peaks.

    A temporary file the process held before the watch began counts at its size then: the
    attack is judged by the files it makes the server open. (An in-process server shares
    pytest's descriptors, and pytest's capture file in /tmp grows with every log line.)"""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.rss_before = host_probes.rss_bytes(pid)
        self.peak_rss = self.rss_before or 0
        self.held_before = temp_files(pid) or {}
        self.temp_before = sum(self.held_before.values())  # what the process held before the attack
        self.peak_temp = self.temp_before
        self.stop = threading.Event()

    def temp_bytes(self) -> int | None:
        """Temporary-file bytes now, a file held before counted at its size then."""
        files = temp_files(self.pid)
        if files is None:
            return None
        return sum(self.held_before.get(key, size) for key, size in files.items())

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_INTERVAL_S):
            self.peak_rss = max(self.peak_rss, host_probes.rss_bytes(self.pid) or 0)
            self.peak_temp = max(self.peak_temp, self.temp_bytes() or 0)
