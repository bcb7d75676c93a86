"""Many adapters at once (llama4.lora.multi): a batch whose rows are on different adapters, or none, computes
for each row what that row computes alone on the model with only its adapter applied (load_adapter), fp32;
through prefill pieces, a multi-row prefill and ragged decode steps, for top-1 and top-2 routing."""

import copy
import dataclasses
import json

import pytest
import torch

import llama4
from llama4.lora import LoraConfig, apply_lora, load_adapter, save_adapter
from llama4.lora.multi import AdapterError, MultiLora, MultiLoraExperts, UnknownAdapter, read_adapter
from llama4.model.cache import KVCache
from tests.lora.helpers import lora_config_model, randomize_adapters, rel_err

ADAPTERS = {  # name -> (rank, targets, seed): different ranks, targets and experts
    "a": (4, ("attention", "shared", "mlp", "experts"), 1),
    "b": (2, ("wq", "wv", "experts.down", "up"), 2),
}


def _adapter_dir(base, tmp_path, name, rslora=False):
    rank, targets, seed = ADAPTERS[name]
    model = copy.deepcopy(base)
    apply_lora(model, LoraConfig(rank=rank, alpha=2 * rank + 1, rslora=rslora, targets=targets), seed=seed)
    randomize_adapters(model, seed=seed, std=0.2)
    path = tmp_path / name
    save_adapter(model, path)
    return path


@pytest.fixture(scope="module", params=[1, 2], ids=["top1", "top2"])
def setup(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"adapters{request.param}")
    base = lora_config_model(top_k=request.param, seed=4, std=0.2)
    paths = {name: _adapter_dir(base, tmp, name) for name in ADAPTERS}
    solo = {None: copy.deepcopy(base)} | {name: load_adapter(copy.deepcopy(base), path) for name, path in paths.items()}
    multi_model = copy.deepcopy(base)
    multi = MultiLora(multi_model, max_loras=3, max_rank=4)
    for name, path in paths.items():
        multi.load(name, str(path))
    for model in (*solo.values(), multi_model):
        model.set_batch_invariant(True)
    return base, paths, solo, multi


def _prompt(length, seed):
    return torch.randint(3, 64, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prefill(model, prompt, cache, chunk, rows=None, slot=0):
    logits = None
    for at in range(0, len(prompt), chunk):
        piece = torch.tensor([prompt[at:at + chunk]])
        positions = torch.arange(at, at + piece.shape[1])[None]
        if rows is None:
            logits = model.text(model.embed(piece), positions, cache, num_logits=1)
        else:
            with rows.using([slot] * piece.shape[1]):
                logits = model.text(model.embed(piece), positions, cache, num_logits=1)
    return logits[:, -1]


def _solo(model, prompt, fed, chunk):
    """Last-prompt logits, then the logits after each token of ``fed``, one sequence alone."""
    cache = KVCache(model.config.text)
    out = [_prefill(model, prompt, cache, chunk)[0]]
    for token in fed:
        out.append(model(torch.tensor([[token]]), cache=cache)[0, -1])
    return torch.stack(out)


ROWS = [(None, 13, 0), ("a", 7, 1), ("b", 18, 2), ("a", 11, 3), (None, 5, 4)]  # (adapter, prompt length, seed)


def test_a_mixed_batch_equals_each_rows_solo_run_with_its_adapter(setup):
    _, _, solo, multi = setup
    model = multi.model
    prompts = [_prompt(length, seed) for _, length, seed in ROWS]
    fed = [_prompt(6, 10 + i) for i in range(len(ROWS))]
    slots = [0 if name is None else multi.get(name).slot for name, _, _ in ROWS]
    with torch.inference_mode():
        caches, first = [], []
        for prompt, slot in zip(prompts, slots):  # each prompt prefilled in pieces of 4 (a partial last piece)
            caches.append(KVCache(model.config.text))
            first.append(_prefill(model, prompt, caches[-1], 4, multi.rows, slot)[0])
        cache = KVCache.stack(caches)
        steps = [torch.stack(first)]
        for step in range(len(fed[0])):  # ragged decode: every row at its own length, on its own adapter
            ids = torch.tensor([[f[step]] for f in fed])
            with multi.rows.using(slots):
                steps.append(model(ids, cache=cache)[:, -1])
        batch = torch.stack(steps, 1)
        for i, (name, _, _) in enumerate(ROWS):
            ref = _solo(solo[name], prompts[i], fed[i], chunk=64)  # unsplit prefill
            assert torch.equal(batch[i], ref), (name, rel_err(batch[i], ref))
        # and the adapters matter: a row's logits on another adapter differ
        other = _solo(solo["b"], prompts[1], fed[1], chunk=64)
        assert rel_err(batch[1], other) > 1e-3


def test_a_multi_row_prefill_keeps_each_rows_adapter(setup):
    """Rows of one [B, T] prefill on different adapters: slots follow the model's b * T + t order."""
    _, _, solo, multi = setup
    model = multi.model
    names = ["b", None, "a"]
    prompts = torch.tensor([_prompt(9, 20 + i) for i in range(3)])
    slots = [0 if n is None else multi.get(n).slot for n in names]
    with torch.inference_mode():
        cache = KVCache(model.config.text)
        with multi.rows.using(torch.tensor(slots)[:, None].expand(3, 9)):
            logits = model(prompts, cache=cache)
        for i, name in enumerate(names):
            ref = solo[name](prompts[i:i + 1])
            assert rel_err(logits[i], ref[0]) < 1e-5


def test_without_batch_invariance_rows_agree_to_rounding(setup):
    base, paths, solo, _ = setup
    model = copy.deepcopy(base)
    multi = MultiLora(model, max_loras=2, max_rank=4)
    for name, path in paths.items():
        multi.load(name, str(path))
    prompts = [_prompt(length, seed) for _, length, seed in ROWS[:3]]
    with torch.inference_mode():
        for (name, _, _), prompt in zip(ROWS[:3], prompts):
            slot = 0 if name is None else multi.get(name).slot
            cache = KVCache(model.config.text)
            ours = _prefill(model, prompt, cache, 5, multi.rows, slot)
            solo[name].set_batch_invariant(False)
            ref = _solo(solo[name], prompt, [], chunk=5)
            solo[name].set_batch_invariant(True)
            assert rel_err(ours[0], ref[0]) < 1e-5


def test_rows_on_no_adapter_and_no_slots_set_run_the_base(setup):
    base, _, solo, multi = setup
    ids = torch.tensor([_prompt(10, 7)])
    with torch.inference_mode():
        assert torch.equal(multi.model(ids), solo[None](ids))  # no slots set: the base
        with multi.rows.using([0] * 10):
            assert torch.equal(multi.model(ids), solo[None](ids))


def test_unload_then_load_again_reuses_the_slot_and_a_full_server_refuses(setup, tmp_path):
    base, paths, solo, _ = setup
    model = copy.deepcopy(base)
    model.set_batch_invariant(True)
    multi = MultiLora(model, max_loras=1, max_rank=4)
    first = multi.load("a", str(paths["a"]))
    with pytest.raises(AdapterError, match="all 1 adapter slots are taken"):
        multi.load("b", str(paths["b"]))
    with pytest.raises(AdapterError, match="already loaded"):
        multi.load("a", str(paths["b"]))
    multi.unload("a")
    with pytest.raises(UnknownAdapter, match="'a'"):
        multi.get("a")
    again = multi.load("b", str(paths["b"]))
    assert again.slot == first.slot and again.uid != first.uid
    ids = torch.tensor([_prompt(8, 9)])
    with torch.inference_mode(), multi.rows.using([again.slot] * 8):
        ours = model(ids)
    assert torch.equal(ours, solo["b"](ids))  # nothing of "a" is left in the slot (its targets differ)


def test_bad_adapters_are_refused_with_the_reason(setup, tmp_path):
    base, paths, _, multi = setup
    with pytest.raises(AdapterError, match="adapter_config.json"):
        multi.read(str(tmp_path / "nowhere"))
    with pytest.raises(AdapterError, match="exceeds the largest rank this server takes, 2"):
        read_adapter(multi.model, str(paths["a"]), max_rank=2)
    other = copy.deepcopy(base)
    apply_lora(other, LoraConfig(rank=4, targets=("wq",)))
    save_adapter(other, tmp_path / "wq")
    assert read_adapter(multi.model, str(tmp_path / "wq")).targets == ["text.layers.0.attn.qkv.wq",
                                                                       "text.layers.1.attn.qkv.wq"]
    document = json.loads((tmp_path / "wq" / "adapter_config.json").read_text())
    document["r"] = 3  # the config's rank no longer that of its tensors
    (tmp_path / "wq" / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(AdapterError, match="rank or target mismatch"):
        read_adapter(multi.model, str(tmp_path / "wq"))
    wider = lora_config_model(top_k=1)  # the same names, other widths: an adapter for another model
    wider_text = dataclasses.replace(wider.config.text, hidden_size=64)
    wide = llama4.random_model(dataclasses.replace(wider.config, text=wider_text), seed=0)
    apply_lora(wide, LoraConfig(rank=4, targets=("wq",)))
    save_adapter(wide, tmp_path / "wide")
    with pytest.raises(AdapterError, match=r"lora A has shape \(4, 64\).*need \(4, 32\)"):
        read_adapter(multi.model, str(tmp_path / "wide"))


def test_packed_or_already_adapted_models_are_refused(setup):
    base, paths, _, _ = setup
    adapted = load_adapter(copy.deepcopy(base), paths["a"])
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        MultiLora(adapted, 2, 4)
    packed = copy.deepcopy(base)
    packed.kernel_options = object()  # what kernels.cpu.pack marks a packed model with
    with pytest.raises(ValueError, match="packed for the CPU kernels"):
        MultiLora(packed, 2, 4)


def test_experts_refuse_rows_without_their_tokens(setup):
    _, _, _, multi = setup
    experts = next(m for m in multi.model.modules() if isinstance(m, MultiLoraExperts))
    x = torch.randn(3, 32)
    experts.expert(0, x)  # no slots set: the base
    with multi.rows.using([1, 1, 1]), pytest.raises(RuntimeError, match="with_shared"):
        experts.expert(0, x)
