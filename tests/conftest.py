"""Test-wide set-up.

torchvision (installed only for the image-preprocessing oracle) ships compiled detection ops that do
not load against the CPU torch wheel; its `_meta_registrations` module then fails at import, and with it
every transformers import. Resize and normalise never use those ops, so an empty stand-in is enough.
Hypothesis runs derandomized (below).
"""

import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# The property tests draw the same examples on every run, so a CI result does not depend on which random
# examples a run happened to try (each test's own settings still apply on top).
settings.register_profile("llama4", derandomize=True)
settings.load_profile("llama4")


@pytest.fixture(autouse=True, scope="session")
def _kernels_from_the_environment():
    """Loads in the tests use the CPU fast paths the environment names (LLAMA4_CPU_KERNEL, LLAMA4_FUSED_DECODE),
    as the command line does: ``make test-cpu-paths`` runs the suite on other CPUs' paths that way. (Engine
    child processes and CLI subprocesses read the same variables themselves.)"""
    import os

    from llama4 import build
    from llama4.kernels.cpu import KernelOptions

    before = build.DEFAULT_KERNELS
    build.DEFAULT_KERNELS = KernelOptions.from_environ(os.environ)
    yield
    build.DEFAULT_KERNELS = before


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Run the suite with one intra-op thread.

    Every tensor in the tests is tiny, so one thread loses nothing; on a small shared machine (2 cores,
    other jobs running) torch's thread pool spin-waits and tiny ops became ~500x slower (measured: a
    19-step decode of an 8-layer toy model took 8.5 s with 2 threads, 0.03 s with 1).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def embed_widths(monkeypatch):
    """Records the token count of every ``Llama4Model.embed`` call made during the test."""
    from llama4.model.transformer import Llama4Model

    widths: list[int] = []
    embed = Llama4Model.embed

    def recording(self, input_ids, pixel_values=None):
        widths.append(input_ids.shape[1])
        return embed(self, input_ids, pixel_values)

    monkeypatch.setattr(Llama4Model, "embed", recording)
    return widths
