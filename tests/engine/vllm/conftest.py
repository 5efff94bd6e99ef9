"""The random-weight S3Gen the vocoder tests share (one per test module, one CPU thread: the
test machine's cores are shared)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def s3gen():
    from chatterbox.models.s3gen import S3Gen

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield S3Gen().eval()
    torch.set_num_threads(threads)
