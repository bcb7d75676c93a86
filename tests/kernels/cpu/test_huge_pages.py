"""huge_pages.place: packed weights copied onto transparent huge pages keep their values, their slabs stay mapped
while any tensor in them lives, and a packed model computes the same bits with and without them."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import torch

import llama4
from llama4.kernels.cpu import KernelOptions, huge_pages, pack
from llama4.kernels.cpu.packing import PackedWeight
from llama4.presets import text_config
from llama4.quant.formats import WeightFormat, quantize
from tests.kernel_support import KERNEL

needs_huge_pages = pytest.mark.skipif(not huge_pages.available(),
                                      reason="transparent huge pages are not available here")


@needs_huge_pages
def test_placed_tensors_equal_their_sources_and_survive_their_slab(monkeypatch):
    monkeypatch.setattr(huge_pages, "_SLABS", huge_pages._Slabs())
    monkeypatch.setattr(huge_pages, "SLAB_BYTES", 1 << 20)  # many slabs from a few tensors
    g = torch.Generator().manual_seed(0)
    sources = [torch.randint(-128, 127, (size,), generator=g, dtype=torch.int8) for size in (70_000, 300_000)] * 6
    sources += [torch.randn(3, 5000, generator=g).bfloat16(), torch.randn(600_000, generator=g)]  # own mapping
    placed = [huge_pages.place(s) for s in sources]
    assert all(p.dtype == s.dtype and p.shape == s.shape and torch.equal(p, s) for p, s in zip(placed, sources))
    assert all(p.data_ptr() % huge_pages.ALIGN == 0 for p in placed)
    assert len({p.data_ptr() for p in placed}) == len(placed)
    survivors = placed[::3]
    del placed
    monkeypatch.setattr(huge_pages, "_SLABS", huge_pages._Slabs())  # no reference to any slab but the tensors'
    gc.collect()
    assert all(torch.equal(p, s) for p, s in zip(survivors, sources[::3]))


@needs_huge_pages
def test_slabs_are_huge_page_aligned_and_advised():
    region = huge_pages._Slabs()._mapping(4 << 20)
    assert region.data_ptr() % huge_pages.HUGE_PAGE == 0
    region.fill_(1)
    assert _advised(region.data_ptr())


def _advised(address: int) -> bool:
    """Whether the mapping that holds ``address`` is marked MADV_HUGEPAGE (``hg`` in /proc/self/smaps)."""
    mapping, flags = None, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        bounds = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if bounds:
            mapping = int(bounds.group(1), 16) <= address < int(bounds.group(2), 16)
        elif mapping and line.startswith("VmFlags:"):
            flags = line.split()[1:]
    return flags is not None and "hg" in flags


def test_tensors_it_cannot_take_stay_in_place(monkeypatch):
    monkeypatch.setattr(huge_pages, "_AVAILABLE", False)  # (as where the OS offers no huge pages)
    t = torch.arange(10)
    assert huge_pages.place(t) is t
    monkeypatch.setattr(huge_pages, "_AVAILABLE", True)
    strided = torch.arange(20).view(4, 5).t()
    assert huge_pages.place(strided) is strided
    assert huge_pages.place(torch.empty(0)).numel() == 0


@pytest.mark.skipif(KERNEL is None, reason="no CPU kernel on this machine")
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4-g32-asym"])
def test_resident_weights_multiply_as_temporary_ones(fmt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(192, 256, generator=g) * 0.05
    weight = w.bfloat16() if fmt == "bf16" else quantize(w, WeightFormat.parse(fmt), torch.bfloat16)
    resident, temporary = PackedWeight(weight, KERNEL, huge_pages.place), PackedWeight(weight, KERNEL)
    x = torch.randn(5, 256, generator=g).bfloat16()
    assert torch.equal(KERNEL.linear(x, resident.address, resident.shape),
                       KERNEL.linear(x, temporary.address, temporary.shape))
    kept = resident.quantized.codes if resident.quantized is not None else resident.blocked
    if huge_pages.available() and kept is not None:  # (None: a bf16 weight in oneDNN's own opaque tensor)
        assert _advised(kept.data_ptr())


def test_a_packed_model_computes_the_same_bits_without_huge_pages():
    config = llama4.ModelConfig(text=text_config(
        num_layers=2, vocab_size=128, hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32,
        intermediate_size=64, intermediate_size_mlp=128, num_experts=2, num_experts_per_tok=1,
        attention_chunk_size=16, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0))
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    logits = []
    for huge in (True, False):
        model = pack(llama4.random_model(config, dtype=torch.bfloat16, std=0.05, seed=2),
                     KernelOptions(huge_pages=huge))
        places = {m.place for m in model.modules() if hasattr(m, "place") and hasattr(m, "kernel")}
        assert places == ({huge_pages.place} if huge else {None})
        with torch.inference_mode():
            cache = llama4.KVCache(config.text)
            steps = [model(ids, cache=cache)]
            steps += [model(torch.tensor([[t]]), cache=cache) for t in (7, 3, 12)]
        logits.append(torch.cat([s.flatten() for s in steps]))
    assert torch.equal(logits[0], logits[1])
