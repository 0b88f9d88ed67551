"""Training tests run torch on one intra-op thread.

The CI machine has two cores shared with other suites. With more runnable threads than cores, torch's OpenMP
workers wait at every parallel region for a peer that is not scheduled, and training gets 10-50x slower
(measured here: mobilenet_v3_small steps at 2-9 samples/s on two threads, 108-142 on one, under the same load).
One thread keeps the suite's time predictable; it changes no result the tests check. The worker subprocesses
the tests start get OMP_NUM_THREADS=1 for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
