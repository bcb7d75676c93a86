from types import SimpleNamespace

import torch

import llama4
from llama4.build import random_model
from llama4.info import model_info
from llama4.train.recipe import INSTRUCT, PRETRAIN, embedded_config, recipe_record
from llama4.train.trainer import TrainConfig, train

FAKE_TOKENIZER = SimpleNamespace(vocab_size=8192, bos_id=6144, eos_ids=(6145, 6151, 6152), pad_id=6162,
                                 patch_id=6236, image_start_id=6224, image_end_id=6225)


def test_embedded_shape_is_llama4_at_small_scale():
    config = embedded_config(FAKE_TOKENIZER)
    info = model_info(config)
    assert info["total_params"] * 2 <= 25_000_000  # bf16 bytes
    text = config.text
    assert text.num_experts >= 4 and text.num_experts_per_tok == 1 and text.use_qk_norm
    layers = text.layers
    assert all(layer.moe for layer in layers)
    assert [layer.use_rope for layer in layers] == [True, True, True, False]
    assert [layer.chunked for layer in layers] == [True, True, True, False]
    assert layers[3].temperature_tuning and not layers[0].temperature_tuning
    assert text.floor_scale <= PRETRAIN.seq_len
    assert PRETRAIN.seq_len >= 3 * text.attention_chunk_size  # training rows span several chunks
    assert config.multimodal and config.image_token_id == FAKE_TOKENIZER.patch_id
    assert INSTRUCT.seq_len == PRETRAIN.seq_len


def test_recipe_record_names_data_hashes_and_code(tmp_path):
    data = tmp_path / "data"
    from llama4.train.data import CORPUS_FILES
    from llama4.train.instruct_data import IDENTITY_FILE

    for rel in list(CORPUS_FILES.values()) + [IDENTITY_FILE]:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b"x")
    record = recipe_record(data)
    assert set(record["data_sha256"]) == set(CORPUS_FILES.values()) | {IDENTITY_FILE}
    assert all(len(h) == 64 for h in record["data_sha256"].values())
    assert record["stages"]["pretrain"]["steps"] == PRETRAIN.steps and record["code_version"]


def test_training_on_picture_batches_updates_the_vision_tower(tmp_path):
    from llama4.prompt import train_tokenizer
    from llama4.train.instruct_data import ImageBatches

    tok = train_tokenizer(["What colour is the shape? It is red. They are circles."] * 10, 300)
    model = random_model(embedded_config(tok), seed=0)
    before = model.vision.patch_embed.weight.detach().clone()
    batches = ImageBatches(tok, 2, 256, seed=0)
    held_out = [next(ImageBatches(tok, 2, 256, seed=99))]
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=256, lr=1e-3, min_lr=1e-4, warmup=1, eval_every=2,
                      eval_batches=1, checkpoint_every=2, log_every=1)
    result = train(model, cfg, batches, held_out, tmp_path)
    assert result.step == 2 and result.eval_history
    assert not torch.equal(before, model.vision.patch_embed.weight)
    reloaded = llama4.load_model(tmp_path / "checkpoint" / "model", pack=False)
    assert torch.equal(reloaded.vision.patch_embed.weight, model.vision.patch_embed.weight)
