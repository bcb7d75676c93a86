"""The model card of a recipe-built model: written from what the run recorded, never typed by hand.

Inputs are the model directory (config, ``recipe.json``) and the ``llama4 eval`` report; the card
states the architecture, parameter counts, data and licenses, the training curves, the evaluation
figures with their baselines, unedited samples and the limitations.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llama4.checkpoint.generation_config import GenerationDefaults, write_generation_defaults
from llama4.info import model_info
from llama4.train.instruct_data import DIALOGUES

DATA_LICENSES = (
    ("TinyStories (first 5,061 train stories; validation head held out)", "CDLA-Sharing-1.0",
     "tinystories/LICENSE-CDLA-Sharing-1.0.txt", "Eldan & Li, 2023"),
    ("Public-domain fairy tales and fables (12 books)", "public domain (USA)", None, "Project Gutenberg texts"),
    ("Microsoft Personality Chat small talk, 'friend' persona", "MIT", "chat/smalltalk/LICENSE-MIT-Microsoft.txt",
     "Copyright (c) Microsoft Corporation"),
    ("Identity Q&A template (LLaMA-Factory), filled with this model's name", "Apache-2.0",
     "chat/identity/LICENSE-Apache-2.0.txt", "hiyouga/LLaMA-Factory"),
    (f"Schema-Guided Dialogue, a {DIALOGUES}-dialogue subset cut to 6 turns, under a booking-assistant system "
     "prompt", "CC BY-SA 4.0",
     "chat/sgd/LICENSE-CC-BY-SA-4.0.txt", "Google Research (Rastogi et al., 2020)"),
)


def copy_licenses(data_dir: Path, model_dir: Path) -> None:
    """The license texts of the data the weights derive from, into ``<model>/licenses/``."""
    target = model_dir / "licenses"
    target.mkdir(exist_ok=True)
    for _, _, path, _ in DATA_LICENSES:
        if path is not None:
            shutil.copyfile(data_dir / path, target / Path(path).name)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


RELIABLE = 0.9  # picture-question accuracy the card calls reliable (the bar)
RECOMMENDED = GenerationDefaults(temperature=0.6, top_p=0.9)  # Llama 4 instruct's own; the tiny model's best
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _picture_summary(reliable: list[str], unreliable: list[str]) -> str:
    if reliable and not unreliable:
        return f"{' and '.join(reliable)} questions about them reliably"
    if reliable:
        return f"{' and '.join(reliable)} questions reliably, {' and '.join(unreliable)} questions less so"
    return "them only somewhat better than chance" if unreliable else "questions about them"


def render_card(model_dir: Path, report: dict) -> str:
    recipe = json.loads((model_dir / "recipe.json").read_text())
    info = model_info(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    pictures = report.get("pictures", {})
    reliable = sorted(k for k, r in pictures.items() if r["accuracy"] >= RELIABLE)
    unreliable = sorted(k for k, r in pictures.items() if r["accuracy"] < RELIABLE)
    lines = (_introduction(reliable, unreliable) + _architecture(info, config, recipe) + _evaluation(report)
             + _sampling() + _training(recipe) + _data_and_licenses() + _limitations(reliable, unreliable))
    return "\n".join(lines)


def _introduction(reliable: list[str], unreliable: list[str]) -> list[str]:
    return [
        "# llama4-tiny: the embedded default model",
        "",
        "A small model with the full Llama 4 architecture, trained from scratch by this project's own code "
        "on 2 CPU cores, so that every `llama4` command works with no download. It writes simple "
        "TinyStories-style English and answers chat turns; it was also trained on questions about simple "
        "synthetic pictures and answers " + _picture_summary(reliable, unreliable) + " (see the figures below). "
        "It is a demonstration model, not a useful assistant: real Llama 4 weights load with "
        "`--model PATH`.",
        "",
    ]


def _architecture(info: dict, config: dict, recipe: dict) -> list[str]:
    text, vision = config["text_config"], config["vision_config"]
    rope_layers = ", ".join(str(i) for i, r in enumerate(text["no_rope_layers"]) if r)
    nope_layers = ", ".join(str(i) for i, r in enumerate(text["no_rope_layers"]) if not r)
    return [
        "## Architecture",
        "",
        f"- {info['total_params']:,} parameters in total, {info['active_params']:,} active per token "
        f"(text {info['text_params']:,}; vision tower + projector {info['vision_params']:,}).",
        f"- {text['num_hidden_layers']} decoder layers, hidden {text['hidden_size']}, {text['num_attention_heads']} "
        f"query / {text['num_key_value_heads']} key-value heads of {text['head_dim']}.",
        f"- Every layer MoE: {text['num_local_experts']} routed experts (sigmoid top-{text['num_experts_per_tok']}) "
        f"+ a shared expert, expert width {text['intermediate_size']}.",
        f"- iRoPE: layers {rope_layers} use RoPE with chunked attention ({text['attention_chunk_size']}-token "
        f"chunks); layer(s) {nope_layers} have no position embedding, full causal attention and "
        f"attention-temperature tuning (floor scale {text['floor_scale']}); QK-norm.",
        f"- Vision: {vision['image_size']} px tiles, {vision['patch_size']} px patches, a "
        f"{vision['num_hidden_layers']}-layer encoder of width {vision['hidden_size']}, pixel shuffle to 144 tokens "
        "per tile, adapter and projector; early fusion at the `<|patch|>` tokens.",
        f"- Tokenizer: {recipe['base_vocab']:,} BPE tokens trained on the pretraining text with this project's "
        "trainer (Llama 4's pre-tokenizer regex), followed by Llama 4's 2,048 special-token slots.",
        "- Stored as bfloat16 safetensors in the Hugging Face layout; transformers' "
        "`Llama4ForConditionalGeneration` loads it (tested).",
        "",
    ]


def _evaluation(report: dict) -> list[str]:
    """The figures against their baselines, then the unedited samples."""
    ppl = report["perplexity"]
    lines = [
        "## Evaluation (`llama4 eval`)",
        "",
        "| measure | this model | baseline |",
        "|---|---|---|",
        f"| perplexity, held-out TinyStories ({ppl['tokens']:,} tokens) | {ppl['perplexity']:.2f} | "
        f"{ppl['unigram_baseline']:.1f} (unigram fitted on the training stories) |",
    ]
    for kind, r in report.get("pictures", {}).items():
        lines.append(f"| {kind} questions on {r['questions']} fresh synthetic pictures | {_pct(r['accuracy'])} | "
                     f"{_pct(r['chance'])} (chance) |")
    lines += ["", "Unedited greedy samples:", ""]
    for s in report.get("samples", []):
        lines += [f"- {s['kind']} `{s['prompt']}`", "", "  > " + s["output"].strip().replace("\n", "\n  > "), ""]
    return lines


def _sampling() -> list[str]:
    return [
        "## Sampling",
        "",
        f"Recommended: temperature {RECOMMENDED.temperature:g} with top_p {RECOMMENDED.top_p:g}, or 0 (greedy). They "
        "are in `generation_config.json`, so `llama4 serve` uses them for requests that set neither. At the "
        "OpenAI clients' default temperature of 1.0 this small model loses the thread within a sentence "
        "(made-up words, broken grammar).",
        "",
    ]


def _training(recipe: dict) -> list[str]:
    """How to rebuild the model, its stages (numbered: the vision stage is optional), times and curves."""
    stages = recipe["stages"]
    lines = [
        "## Training",
        "",
        f"Rebuild: `{recipe['command']}` (from the repository root, with the shared data beside it; "
        "resumable). Code version `" + recipe["code_version"] + "`, torch " + recipe["torch"] + ".",
        "",
        _pretrain_stage(recipe),
    ]
    if "vision" in stages:
        lines.append(_vision_stage(stages, recipe.get("vision_probe_accuracy", {})))
    scale = stages["instruct"].get("vision_lr_scale", 1.0)
    lines += [
        f"{3 if 'vision' in stages else 2}. Instruct: {stages['instruct']['steps']} steps mixing (in the pattern "
        f"{', '.join(stages['instruct_pattern'])}) chats, synthetic-picture questions and pretraining text, "
        f"lr {stages['instruct']['lr']}" + (f" (the vision tower at {scale:g}x)" if scale != 1.0 else "") + ".",
        "",
    ]
    for name, seconds in recipe.get("seconds", {}).items():
        lines.append(f"- {name}: {seconds / 60:.1f} min on this run's machine")
    curves = " ".join(f"![{stage} loss]({stage}_loss.png)"
                      for stage in ("pretrain", "vision", "vision_mean", "instruct") if stage in stages)
    return lines + ["", curves, "",
                    "Per-expert token shares at the end of training (per MoE layer): "
                    + "; ".join(str(s) for s in recipe.get("expert_shares", [])), ""]


def _pretrain_stage(recipe: dict) -> str:
    stages = recipe["stages"]
    pretrain, rows = stages["pretrain"], stages["image_rows"]
    return (f"1. Pretraining: {pretrain['steps']} steps of {pretrain['batch_size']} x {pretrain['seq_len']} tokens, "
            f"TinyStories with {int(100 * recipe['tales_share'])} % tales, batches in the pattern "
            f"{', '.join(stages['pretrain_pattern'])} (picture batches: {rows['batch_size']} pictures, one per "
            f"{rows['seq_len']}-token row), AdamW lr {pretrain['lr']} (warm-up, cosine), router load-balancing loss "
            f"x{pretrain['aux_coef']}.")


def _vision_stage(stages: dict, probe: dict) -> str:
    """``probe``: the held-out accuracy of each temporary head (older recipes: of the one pooled head)."""
    heads = probe if all(isinstance(v, dict) for v in probe.values()) else {"pooled": probe}
    facts = next(iter(heads.values()), {})
    where = {"pooled": "mean- and max-pooled output", "mean": "mean output"}
    vision = stages["vision"]
    return (
        f"2. Vision: a fresh vision tower, {vision['steps']} steps of {vision['batch_size']} "
        f"fresh synthetic pictures, learning each picture's {', '.join(facts) or 'facts'} through temporary "
        f"linear heads on its {' and on its '.join(where.get(h, h) for h in heads)} (lr {vision['lr']}"
        + (f", decaying; then {stages['vision_mean']['steps']} steps at a constant lr {stages['vision_mean']['lr']}"
           if "vision_mean" in stages else "")
        + "); the heads are dropped and the tower replaces the one from pretraining."
        + "".join(f" {where.get(h, h).capitalize()} head accuracy on held-out pictures: "
                  + ", ".join(f"{k} {_pct(v)}" for k, v in acc.items()) + "." for h, acc in heads.items()))


def _data_and_licenses() -> list[str]:
    lines = ["## Data and licenses", "",
             "The weights are derived from the data below; the license texts are in `licenses/`. Data "
             "SHA-256 hashes are in `recipe.json`.", ""]
    return lines + [f"- {what}: {license_name} ({who})." for what, license_name, _, who in DATA_LICENSES]


def _limitations(reliable: list[str], unreliable: list[str]) -> list[str]:
    return [
        "",
        "## Limitations",
        "",
        "- About 12 M parameters and a few million training tokens: stories drift and repeat, facts are "
        "invented, instructions outside small talk, identity questions and story requests are not followed.",
        "- Pictures: " + (f"{' and '.join(reliable)} answers are right on at least {RELIABLE:.0%} of fresh "
                          "synthetic scenes" if reliable else "no kind of question is answered reliably")
        + (f"; {' and '.join(unreliable)} answers are not" if unreliable else "") + " (figures above). "
        "It knows only the synthetic scenes (one kind of shape in one colour on a plain background); on "
        "photographs it answers with those words anyway.",
        "- Chat: greetings and questions about itself get its name and maker, story requests get a story "
        "(not always about the topic asked); most other small talk gets that same identity line or a stock "
        "small-talk answer (\"I'm a work in progress.\").",
        "- English only; the tokenizer still round-trips any text (byte fallback) but compresses other "
        "scripts poorly.",
        "- Context: trained on 1,024-token rows; longer prompts work mechanically (iRoPE, chunked cache) but "
        "quality falls off. A picture is seen by the chunked layers only from inside its 256-token chunk: "
        "ask about it in the turn that carries it.",
        "",
    ]


def write_model_card(model_dir: str | Path, report: dict) -> Path:
    """The card (README.md), with eval.json and the recommended sampling in generation_config.json."""
    model_dir = Path(model_dir)
    (model_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    text = json.loads((model_dir / "config.json").read_text()).get("text_config", {})
    write_generation_defaults(model_dir, RECOMMENDED, **{k: text[k] for k in TOKEN_ID_FIELDS if k in text})
    path = model_dir / "README.md"
    path.write_text(render_card(model_dir, report))
    return path
