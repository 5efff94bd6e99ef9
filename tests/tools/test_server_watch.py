"""The /proc probes the attack tool reports with: temporary files an attack makes the server open
are counted; a file the process held before counts at its size then (pytest's capture file in
/tmp grows with every log line and once failed CI's 'no temp left behind' check)."""

from __future__ import annotations

import os
import tempfile
import time

from gateway.tools.server_watch import ServerWatch, open_fds, temp_files


def test_temp_files_sees_open_and_unlinked_files_under_the_temp_dir() -> None:
    with tempfile.TemporaryFile() as spooled:  # unlinked at once, like a spooled upload
        spooled.write(b"x" * 5000)
        spooled.flush()
        files = temp_files(os.getpid())
        assert files is not None
        info = os.fstat(spooled.fileno())
        assert files[(info.st_dev, info.st_ino)] == 5000
    files = temp_files(os.getpid())
    assert files is not None and (info.st_dev, info.st_ino) not in files
    assert temp_files(2**22 + 12345) is None  # no such process
    assert (open_fds(os.getpid()) or 0) > 0


def test_a_file_held_before_the_watch_counts_at_its_size_then() -> None:
    with tempfile.TemporaryFile() as held:
        held.write(b"a" * 1000)
        held.flush()
        watch = ServerWatch(os.getpid())
        base = watch.temp_before
        assert base >= 1000
        held.write(b"b" * 100_000)  # grows during the attack: not the attack's doing
        held.flush()
        assert watch.temp_bytes() == base
        with tempfile.TemporaryFile() as made:  # opened during the attack: counted
            made.write(b"c" * 70_000)
            made.flush()
            watch.start()
            deadline = time.monotonic() + 5
            while watch.peak_temp < base + 70_000 and time.monotonic() < deadline:
                time.sleep(0.05)
            watch.stop.set()
            watch.join()
            assert watch.peak_temp == base + 70_000
            assert watch.temp_bytes() == base + 70_000
        assert watch.temp_bytes() == base  # closed: nothing left behind
