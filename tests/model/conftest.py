"""Run these tests single-threaded.

On a small shared machine (2 cores, other jobs running) torch's intra-op thread pool spin-waits and
tiny ops become ~500x slower (measured: a 19-step decode of an 8-layer toy model took 8.5 s with 2
threads, 0.03 s with 1). The tensors here are tiny, so one thread loses nothing. Restored afterwards.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
