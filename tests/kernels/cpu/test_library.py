"""The C kernels for decode-sized products on oneDNN-packed bf16 weights (llama4.kernels.cpu.library), every
variant this CPU runs (AMX, AVX-512 BF16, AVX-512, AVX2).

References: a float64 product (tolerance: one bf16 rounding), every row's result alone (bit for bit: a
row never depends on its companions), oneDNN's own one-row product on the same packed weight (bit for
bit, the AMX variant), and a full re-derivation of the packed layout.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

import llama4
from llama4.kernels.cpu import KernelOptions
from llama4.kernels.cpu import library as cpu_kernel
from llama4.kernels.cpu import packing as cpu_packing
from llama4.kernels.cpu.packing import PackedWeight, packing_supported
from tests.kernel_support import BF16_PACKING, KERNEL, runnable_variants

needs_kernel = pytest.mark.skipif(
    not BF16_PACKING or KERNEL is None,
    reason="no CPU kernel runs on this machine (no AVX2/AVX-512, no C compiler or no oneDNN bf16 packing)")


RUNNABLE = runnable_variants() if BF16_PACKING else []
# oneDNN runs AMX too unless capped (ONEDNN_MAX_CPU_ISA, as CI does to run the path of CPUs without AMX)
_ONEDNN_ISA = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
ONEDNN_AMX = "AMX" in _ONEDNN_ISA or _ONEDNN_ISA in ("", "ALL", "DEFAULT")


def _onednns_bits(variant: str) -> bool:
    """Whether the kernel is oneDNN's one-row product bit for bit: both on AMX (same tiles, same order)."""
    return variant == "amx" and ONEDNN_AMX


@pytest.fixture(params=RUNNABLE or [pytest.param(None, marks=pytest.mark.skip(reason="no CPU kernel runs here"))])
def variant(request):
    """Each variant this CPU runs."""
    return cpu_kernel.load_variant(request.param)


def _options(kernel: cpu_kernel.Kernel | None, **fields) -> KernelOptions:
    return KernelOptions(variant=kernel.name if kernel is not None else "off", **fields)


SHAPES = [(100, 256), (512, 256), (256, 384), (1536, 1024), (8192, 256), (300, 5120)]


def _onednn(x: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.default(x, weight.tensor, None, "none", [], "")


def _weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=g) * in_features ** -0.5).bfloat16()


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_onednn_packs_bf16_weights_in_the_layout_the_kernel_reads(out_features, in_features):
    """Every entry, not a sample: [O, I] zero-padded to 64 x 32 blocks, [O/64, I/32, 16 pairs, 64, 2]."""
    weight = _weight(out_features, in_features)
    packed = PackedWeight(weight, KERNEL)
    if not cpu_kernel.readable(weight, packed.tensor):
        pytest.skip("oneDNN packs bf16 weights in another layout on this CPU")
    padded = torch.zeros(-(-out_features // 64) * 64, in_features, dtype=torch.bfloat16)
    padded[:out_features] = weight
    expected = padded.view(-1, 64, in_features // 32, 16, 2).permute(0, 2, 3, 1, 4).flatten()
    assert torch.equal(cpu_kernel.packed_view(packed.tensor), expected)
    o, i = torch.meshgrid(torch.arange(out_features), torch.arange(in_features), indexing="ij")
    assert torch.equal(expected[cpu_kernel.blocked_index(o.flatten(), i.flatten(), in_features)], weight.flatten())
    assert packed.address is not None


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 16])
def test_kernel_is_within_a_rounding_of_float64_and_each_row_its_solo_product(variant, out_features, in_features,
                                                                              rows):
    """Every variant: one bf16 rounding of the exact product, and a row's bits do not depend on the rows with
    it. AMX: also oneDNN's one-row product bit for bit (the other variants sum the pairs in their own order)."""
    weight = _weight(out_features, in_features, seed=rows)
    packed = PackedWeight(weight, variant)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = variant.linear(x, packed.address, packed.shape)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    exact = x.double() @ weight.double().t()
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()  # one bf16 rounding
    for r in range(rows):
        assert torch.equal(got[r:r + 1], variant.linear(x[r:r + 1], packed.address, packed.shape)), f"row {r}"
        if _onednns_bits(variant.name):
            assert torch.equal(got[r:r + 1], _onednn(x[r:r + 1], packed)), f"row {r}"


def test_the_variants_take_the_best_instruction_set_the_cpu_reports():
    everything = {flag for _, _, flags in cpu_kernel.VARIANTS.values() for flag in flags}
    assert cpu_kernel.candidates("auto", everything) == ["amx", "avx512bf16", "avx512", "avx2"]
    zen4 = everything - {"amx_tile", "amx_bf16"}
    assert cpu_kernel.candidates("auto", zen4) == ["avx512bf16", "avx512", "avx2"]
    assert cpu_kernel.candidates("auto", {"avx2", "fma", "sse4_2"}) == ["avx2"]
    assert cpu_kernel.candidates("auto", {"avx", "sse4_2"}) == []  # nothing is built for a set the CPU lacks
    assert cpu_kernel.candidates("auto", set()) == []  # not x86, or /proc/cpuinfo unreadable
    assert cpu_kernel.candidates("avx2", everything) == ["avx2"]
    assert cpu_kernel.candidates("avx512bf16", {"avx2", "fma"}) == []
    assert cpu_kernel.candidates("off", everything) == []
    with pytest.raises(ValueError, match="CPU kernel 'sse': expected auto, off or one of amx, avx512bf16"):
        cpu_kernel.candidates("sse", everything)


def test_a_rows_result_does_not_depend_on_its_companions_or_the_thread_count(variant):
    weight = _weight(1000, 1024)
    packed = PackedWeight(weight, variant)
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(2)).bfloat16()
    together = variant.linear(x, packed.address, packed.shape)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for start, stop in ((0, 1), (3, 7), (5, 16), (15, 16)):
                assert torch.equal(variant.linear(x[start:stop], packed.address, packed.shape), together[start:stop])
    finally:
        torch.set_num_threads(previous)


def test_where_onednn_cannot_pack_bf16_weights_keep_the_kernels_own_layout(variant, monkeypatch):
    """AVX2 and AVX-512 CPUs without BF16: oneDNN packs no bf16 (or another layout), so the weight is kept in
    the kernel's layout and every product runs on the kernel; a weight the kernel cannot take stays plain."""
    monkeypatch.setattr(cpu_packing, "_onednn_packs", lambda dtype: False)
    assert packing_supported(torch.bfloat16, "cpu", variant)
    weight = _weight(100, 256)
    packed = PackedWeight(weight, variant)
    assert packed.tensor is None and packed.descriptor.data == packed.blocked.data_ptr()
    o, i = torch.meshgrid(torch.arange(100), torch.arange(256), indexing="ij")
    assert torch.equal(packed.blocked[cpu_kernel.blocked_index(o.flatten(), i.flatten(), 256)], weight.flatten())
    assert torch.equal(packed.to_dense(), weight)
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    assert torch.equal(cpu_packing._linear(x[:3], packed), variant.linear(x[:3], packed.address, packed.shape))
    longer = cpu_packing._linear(x, packed)  # on the kernel too, 16 rows a group: each row its solo product
    assert torch.equal(longer, torch.cat([variant.linear(x[r:r + 1], packed.address, packed.shape) for r in range(20)]))
    bias = torch.randn(100).bfloat16()
    assert torch.equal(cpu_packing._linear(x, packed, bias), longer + bias)
    odd = PackedWeight(_weight(64, 200), variant)
    assert odd.address is None and odd.plain is not None
    assert torch.equal(cpu_packing._linear(x[:, :200], odd), torch.nn.functional.linear(x[:, :200], odd.plain))


def test_a_model_packed_in_the_kernels_own_layout_decodes_in_c_and_saves_its_weights(variant, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_packing, "_onednn_packs", lambda dtype: False)
    model = llama4.load_model(dtype=torch.bfloat16, kernels=_options(variant))
    assert all(w.blocked is not None for w in _packed_weights(model.text)) and model.text.fast_decode.ready()
    plain = llama4.load_model(dtype=torch.bfloat16, pack=False)
    ids = torch.randint(3, 8000, (1, 40), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():  # (every product on the kernel)
        got, expected = model(ids), plain(ids)
    assert (got - expected).abs().max() <= expected.abs().max() * 2 ** -4
    llama4.save_model(model, tmp_path)
    reloaded = llama4.load_model(tmp_path, dtype=torch.bfloat16, pack=False)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), plain.state_dict().values()))


@pytest.mark.timeout(120)
def test_a_forked_child_computes_the_same_bits_on_threads_of_its_own(variant):
    """The kernel's thread pool: a forked child has none of the parent's workers and starts its own."""
    packed = PackedWeight(_weight(1000, 1024), variant)
    x = torch.randn(5, 1024, generator=torch.Generator().manual_seed(12)).bfloat16()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = variant.linear(x, packed.address, packed.shape)  # the parent's workers are running
        pid = os.fork()
        if pid == 0:
            os._exit(0 if torch.equal(variant.linear(x, packed.address, packed.shape), expected) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(previous)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_kernel_writes_exactly_its_output_rows_and_columns(variant):
    """Outputs that end inside a 64-wide block are stored under a mask: nothing past row x column."""
    out_features, rows = 70, 3
    packed = PackedWeight(_weight(out_features, 256), variant)
    x = torch.randn(rows, 256).bfloat16()
    guard = torch.full((rows * out_features + 64,), 7.0, dtype=torch.bfloat16)
    variant.lib.llama4_linear(packed.address, out_features, 256, x.data_ptr(), rows, guard.data_ptr(), 2)
    assert torch.equal(guard[:rows * out_features].view(rows, out_features), variant.linear(x, packed.address,
                                                                                               packed.shape))
    assert (guard[rows * out_features:] == 7.0).all()


@needs_kernel
def test_weights_the_kernel_cannot_read_stay_on_onednn():
    assert PackedWeight(_weight(64, 200), KERNEL).address is None  # inputs not a whole number of 32-wide blocks
    assert PackedWeight(_weight(64, 256).float(), KERNEL).address is None  # float32
    other = PackedWeight(_weight(128, 256, seed=1), KERNEL)
    assert not cpu_kernel.readable(_weight(128, 256, seed=2), other.tensor)  # not this weight's packing
    assert not cpu_kernel.readable(_weight(64, 256), other.tensor)  # another size


@needs_kernel
def test_decode_products_take_the_kernel_and_longer_ones_onednn(monkeypatch):
    calls = []
    monkeypatch.setattr(KERNEL, "linear", lambda x, *a: calls.append(x.shape) or torch.zeros(1))
    packed = PackedWeight(_weight(64, 256), KERNEL)
    cpu_packing._linear(torch.randn(1, 1, 256).bfloat16(), packed)
    cpu_packing._linear(torch.randn(16, 256).bfloat16(), packed)
    assert calls == [(1, 1, 256), (16, 256)]
    assert cpu_packing._linear(torch.randn(17, 256).bfloat16(), packed).shape == (17, 64)
    assert cpu_packing._linear(torch.randn(0, 256).bfloat16(), packed).shape == (0, 64)
    assert len(calls) == 2


def test_without_the_kernel_the_model_decodes_the_same_tokens(variant, monkeypatch):
    """The fallback (oneDNN for every product) and the kernel give one model the same decode logits: bit for
    bit on AMX (the kernel is oneDNN's one-row product), to bf16 rounding elsewhere (the layers in torch on
    both sides)."""
    ids = torch.randint(3, 8000, (2, 9), generator=torch.Generator().manual_seed(3))

    def decode(fed: torch.Tensor | None = None, kernel=variant) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy tokens and every step's logits; ``fed``: tokens to feed instead of the greedy ones."""
        model = llama4.load_model(dtype=torch.bfloat16, kernels=_options(kernel, fused_decode=False))
        cache, tokens, steps = llama4.KVCache(model.config.text), ids, []
        with torch.inference_mode():
            logits = model(ids, cache=cache, num_logits=1)[:, -1]
            for i in range(6):
                steps.append(logits)
                chosen = logits.argmax(-1, keepdim=True) if fed is None else fed[:, i:i + 1]
                tokens = torch.cat((tokens, chosen), dim=1)
                logits = model(chosen, cache=cache)[:, -1]
        return tokens[:, ids.shape[1]:], torch.stack(steps)

    tokens, with_kernel = decode()
    off = _options(None)
    assert all(w.address is None for w in _packed_weights(llama4.load_model(dtype=torch.bfloat16, kernels=off)))
    fallback_tokens, fallback = decode(tokens, kernel=None)
    if _onednns_bits(variant.name):
        assert torch.equal(fallback, with_kernel) and torch.equal(decode(kernel=None)[0], tokens)
    else:
        assert (fallback - with_kernel).abs().max() <= 0.05 * with_kernel.abs().max()


def _packed_weights(model) -> list[PackedWeight]:
    found = []
    for module in model.modules():
        for value in vars(module).values():
            items = value if isinstance(value, list) else [value]
            found += [item for item in items if isinstance(item, PackedWeight)]
    return found


def test_a_compiler_that_fails_leaves_the_kernel_off_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: {"avx2", "fma"})
    options = KernelOptions.from_environ({"CC": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path)})
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        assert options.kernel() is None
        assert options.kernel() is None
    assert len(caplog.records) == 1 and "stay on oneDNN" in caplog.records[0].getMessage()
    assert list(tmp_path.rglob("*.so")) == []


def test_the_options_turn_the_kernel_off_or_pick_a_variant():
    assert KernelOptions.from_environ({"LLAMA4_CPU_KERNEL": "off"}).kernel() is None
    assert KernelOptions.from_environ({}) == KernelOptions(variant="auto", fused_decode=True)
    assert not KernelOptions.from_environ({"LLAMA4_FUSED_DECODE": "0"}).fused_decode
    assert KernelOptions.from_environ({}).huge_pages
    assert not KernelOptions.from_environ({"LLAMA4_HUGE_PAGES": "0"}).huge_pages
    with pytest.raises(ValueError, match="CPU kernel 'sse': expected one of auto, off, amx"):
        KernelOptions.from_environ({"LLAMA4_CPU_KERNEL": "sse"})
    if "avx2" in RUNNABLE:
        assert KernelOptions.from_environ({"LLAMA4_CPU_KERNEL": "AVX2"}).kernel().name == "avx2"


def test_groups_in_one_call_equal_each_group_alone_bit_for_bit(variant):
    weights = [PackedWeight(_weight(200, 256, seed=s), variant) for s in range(5)]
    counts = [3, 0, 16, 1, 2]
    x = torch.randn(sum(counts), 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = variant.linear_groups(x, [w.address for w in weights], counts, (200, 256))
    at = 0
    for w, count in zip(weights, counts):
        if count:
            assert torch.equal(got[at:at + count], variant.linear(x[at:at + count], w.address, w.shape))
        at += count
    assert at == got.shape[0]


def _packed_experts(num_experts: int = 6, dim: int = 256, hidden: int = 128):
    from llama4.model.moe import Experts

    experts = Experts(num_experts, dim, hidden)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=g) * dim ** -0.5)
        experts.down.copy_(torch.randn(experts.down.shape, generator=g) * hidden ** -0.5)
    packed = cpu_packing.PackedExperts(experts.bfloat16(), KERNEL)
    packed.load_tensor("gate_up", experts.gate_up.detach())
    packed.load_tensor("down", experts.down.detach())
    return packed


@needs_kernel
@pytest.mark.parametrize("counts", [[2, 0, 1, 5, 0, 0], [1, 1, 1, 1, 1, 3], [0, 17, 0, 0, 2, 0]])
def test_packed_experts_run_sorted_rows_as_each_expert_would_bit_for_bit(counts):
    from llama4.model.moe import each_expert_on_its_rows

    experts = _packed_experts()
    assert experts.groups_in_one_call
    x = torch.randn(sum(counts), 256, generator=torch.Generator().manual_seed(6)).bfloat16()
    calls = []
    real = experts._swiglu_groups
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experts, "_swiglu_groups", lambda x, rows, *a: calls.append(rows) or real(x, rows, *a))
        got = experts.grouped(x, counts)
    assert torch.equal(got, each_expert_on_its_rows(experts, x, counts))
    one_call = max(counts) <= cpu_kernel.MAX_ROWS  # a group longer than a tile: expert by expert instead
    assert calls == ([[c for c in counts if c]] if one_call else [])


@needs_kernel
def test_with_batch_invariance_packed_experts_take_the_grouped_path_and_match_the_one_tile_path():
    from llama4.model import moe

    experts = _packed_experts()
    experts.batch_invariant = True
    g = torch.Generator().manual_seed(7)
    x = torch.randn(7, 256, generator=g).bfloat16()
    ids = torch.tensor([[0], [3], [3], [5], [0], [1], [3]])
    scores = torch.rand(7, 1, generator=g).bfloat16()
    one_tile_path = moe._one_tile_experts
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe, "_one_tile_experts", lambda *a: pytest.fail("took the one-tile path"))
        grouped = moe.sparse_experts(x, ids, scores, experts)
    one_tile = one_tile_path(x, ids.flatten(), scores, experts)
    assert torch.equal(grouped, one_tile)


def _packed_shared(dim: int = 256, hidden: int = 128):
    from llama4.model.moe import SwiGLU

    mlp = SwiGLU(dim, hidden)
    g = torch.Generator().manual_seed(8)
    packed = cpu_packing.PackedSwiGLU(mlp, KERNEL)
    for name, tensor in mlp.named_parameters():
        packed.load_tensor(name, (torch.randn(tensor.shape, generator=g) * tensor.shape[1] ** -0.5).bfloat16())
    return packed


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 16, 17])
@pytest.mark.parametrize("invariant", [False, True])
def test_shared_and_routed_experts_in_one_call_per_matrix_give_the_same_bits(rows, invariant):
    from llama4.model.invariance import set_batch_invariant
    from llama4.model.moe import shared_plus_routed

    experts, shared = _packed_experts(), _packed_shared()
    set_batch_invariant(experts, invariant)
    set_batch_invariant(shared, invariant)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(rows, 256, generator=g).bfloat16()
    ids = torch.randint(6, (rows, 1), generator=g)
    scores = torch.rand(rows, 1, generator=g).bfloat16()
    calls = []
    real = KERNEL.linear_groups
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KERNEL, "linear_groups", lambda *a: calls.append(a[2]) or real(*a))
        got = experts.with_shared(shared, x, ids, scores)
    reference = shared_plus_routed(experts, shared, x, ids, scores)
    assert torch.equal(got, reference)
    if rows <= cpu_kernel.MAX_ROWS:  # fused: the shared expert's rows first, then each chosen expert's
        counts = torch.bincount(ids.flatten(), minlength=6).tolist()
        assert calls[:2] == [[rows] + [c for c in counts if c]] * 2


@needs_kernel
def test_top2_routing_keeps_the_shared_expert_apart():
    experts, shared = _packed_experts(), _packed_shared()
    x = torch.randn(4, 256).bfloat16()
    ids, scores = torch.tensor([[0, 1], [2, 3], [1, 4], [5, 0]]), torch.rand(4, 2).bfloat16()
    from llama4.model.moe import shared_plus_routed

    assert torch.equal(experts.with_shared(shared, x, ids, scores), shared_plus_routed(experts, shared, x, ids, scores))


@pytest.mark.parametrize("experts,dim", [(16, 1024), (128, 5120), (4, 256)])
def test_the_packed_router_gives_the_plain_routers_bits(variant, experts, dim):
    """Up to a tile of rows: each row's one-row product on the kernel, which on AMX is the plain router's
    one-row product bit for bit (elsewhere within a rounding of float64); longer inputs: the plain product."""
    from llama4.model.moe import Router

    router = Router(dim, experts, bias=False)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, dim, generator=torch.Generator().manual_seed(10)) * 0.02)
    router = router.bfloat16()
    packed = cpu_packing.PackedRouter(router, variant)
    packed.load_tensor("weight", router.weight.detach())
    assert packed.packed.address is not None
    x = torch.randn(40, dim, generator=torch.Generator().manual_seed(11)).bfloat16()
    calls = []
    real = variant.linear
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(variant, "linear", lambda rows, *a: calls.append(rows.shape[0]) or real(rows, *a))
        for rows in (1, 5, 16):
            got = packed(x[:rows])
            if _onednns_bits(variant.name):
                assert torch.equal(got, torch.cat([router(x[r:r + 1]) for r in range(rows)]))
            else:
                exact = x[:rows].double() @ router.weight.double().t()
                assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
        assert calls == [1, 5, 16]  # decode-sized inputs on the kernel
        assert torch.equal(packed(x), router(x))
        assert calls == [1, 5, 16]  # a longer input: the plain product
    assert torch.equal(packed.unpack().weight, router.weight)


@pytest.mark.skipif(not BF16_PACKING, reason="bf16 weights are not packed here (no oneDNN bf16 packing, no kernel)")
def test_a_packed_models_routers_keep_their_plain_weight(tmp_path):
    model = llama4.load_model(dtype=torch.bfloat16)
    routers = [m for m in model.modules() if isinstance(m, cpu_packing.PackedRouter)]
    assert routers and all(r.weight.dtype == torch.bfloat16 and r.weight.device.type == "cpu" for r in routers)
    llama4.save_model(model, tmp_path)
    reloaded = llama4.load_model(tmp_path, dtype=torch.bfloat16, pack=False)
    assert torch.equal(reloaded.text.layers[0].ffn.router.weight, routers[0].weight)


@needs_kernel
def test_inputs_the_kernel_cannot_take_are_refused_before_it_runs():
    packed = PackedWeight(_weight(64, 256), KERNEL)
    for bad in (torch.randn(1, 128).bfloat16(), torch.randn(17, 256).bfloat16(), torch.randn(0, 256).bfloat16(),
                torch.randn(2, 256)):
        with pytest.raises(ValueError, match="the CPU kernel takes 1 to 16 bf16 rows of 256 inputs"):
            KERNEL.linear(bad, packed.address, packed.shape)
    address = packed.address
    cases = [(torch.randn(3, 256).bfloat16(), [address] * 2, [2, 2]),  # rows do not add up to the input
             (torch.randn(3, 256).bfloat16(), [address] * 2, [3]),  # one weight per group
             (torch.randn(17, 256).bfloat16(), [address], [17])]  # more than a tile in a group
    for rows, addresses, counts in cases:
        with pytest.raises(ValueError, match="the CPU kernel's groups take"):
            KERNEL.linear_groups(rows, addresses, counts, packed.shape)
