"""THE table of foreign tensor names: Hugging Face checkpoint names <-> this package's parameter names.

Hugging Face Llama 4 checkpoints store every tensor in the layout our modules use (nn.Linear weights as
[out, in]; fused experts as [E, in, out]), so the mapping is a pure renaming. Text tensors carry a
``language_model.`` prefix in multimodal checkpoints (``Llama4ForConditionalGeneration``) and none in
text-only ones (``Llama4ForCausalLM``).
"""

from __future__ import annotations

import re

# (our name, HF name). {i}: layer index; {p}: weight or bias. Text rows get the multimodal prefix.
TEXT_NAMES: tuple[tuple[str, str], ...] = (
    ("text.embed.weight", "model.embed_tokens.weight"),
    ("text.norm.weight", "model.norm.weight"),
    ("text.output.weight", "lm_head.weight"),
    ("text.layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("text.layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("text.layers.{i}.attn.qkv.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("text.layers.{i}.attn.qkv.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("text.layers.{i}.attn.qkv.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("text.layers.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("text.layers.{i}.ffn.router.weight", "model.layers.{i}.feed_forward.router.weight"),
    ("text.layers.{i}.ffn.experts.gate_up", "model.layers.{i}.feed_forward.experts.gate_up_proj"),
    ("text.layers.{i}.ffn.experts.down", "model.layers.{i}.feed_forward.experts.down_proj"),
    ("text.layers.{i}.ffn.shared.gate.weight", "model.layers.{i}.feed_forward.shared_expert.gate_proj.weight"),
    ("text.layers.{i}.ffn.shared.up.weight", "model.layers.{i}.feed_forward.shared_expert.up_proj.weight"),
    ("text.layers.{i}.ffn.shared.down.weight", "model.layers.{i}.feed_forward.shared_expert.down_proj.weight"),
    ("text.layers.{i}.ffn.gate.weight", "model.layers.{i}.feed_forward.gate_proj.weight"),
    ("text.layers.{i}.ffn.up.weight", "model.layers.{i}.feed_forward.up_proj.weight"),
    ("text.layers.{i}.ffn.down.weight", "model.layers.{i}.feed_forward.down_proj.weight"),
)
TEXT_PREFIX = "language_model."

VISION_NAMES: tuple[tuple[str, str], ...] = (
    ("vision.patch_embed.weight", "vision_model.patch_embedding.linear.weight"),
    ("vision.class_embedding", "vision_model.class_embedding"),
    ("vision.pos_embedding", "vision_model.positional_embedding_vlm"),
    ("vision.norm_pre.{p}", "vision_model.layernorm_pre.{p}"),
    ("vision.norm_post.{p}", "vision_model.layernorm_post.{p}"),
    ("vision.layers.{i}.attn_norm.{p}", "vision_model.model.layers.{i}.input_layernorm.{p}"),
    ("vision.layers.{i}.mlp_norm.{p}", "vision_model.model.layers.{i}.post_attention_layernorm.{p}"),
    ("vision.layers.{i}.attn.wq.{p}", "vision_model.model.layers.{i}.self_attn.q_proj.{p}"),
    ("vision.layers.{i}.attn.wk.{p}", "vision_model.model.layers.{i}.self_attn.k_proj.{p}"),
    ("vision.layers.{i}.attn.wv.{p}", "vision_model.model.layers.{i}.self_attn.v_proj.{p}"),
    ("vision.layers.{i}.attn.wo.{p}", "vision_model.model.layers.{i}.self_attn.o_proj.{p}"),
    ("vision.layers.{i}.mlp.fc1.{p}", "vision_model.model.layers.{i}.mlp.fc1.{p}"),
    ("vision.layers.{i}.mlp.fc2.{p}", "vision_model.model.layers.{i}.mlp.fc2.{p}"),
    ("vision.adapter.fc1.weight", "vision_model.vision_adapter.mlp.fc1.weight"),
    ("vision.adapter.fc2.weight", "vision_model.vision_adapter.mlp.fc2.weight"),
    ("projector.{p}", "multi_modal_projector.linear_1.{p}"),
)


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + r"\Z")


def _table(multimodal: bool) -> list[tuple[str, str]]:
    if not multimodal:
        return list(TEXT_NAMES)
    return [(ours, TEXT_PREFIX + hf) for ours, hf in TEXT_NAMES] + list(VISION_NAMES)


_COMPILED: dict[tuple[bool, bool], list[tuple[re.Pattern, str]]] = {}


def _rules(multimodal: bool, to_hf: bool) -> list[tuple[re.Pattern, str]]:
    key = (multimodal, to_hf)
    if key not in _COMPILED:
        _COMPILED[key] = [
            (_compile(src), dst) for ours, hf in _table(multimodal)
            for src, dst in [((ours, hf) if to_hf else (hf, ours))]
        ]
    return _COMPILED[key]


def _translate(name: str, multimodal: bool, to_hf: bool) -> str | None:
    for pattern, target in _rules(multimodal, to_hf):
        m = pattern.match(name)
        if m:
            return target.format(**m.groupdict())
    return None


def to_hf_name(ours: str, multimodal: bool) -> str:
    """Our parameter name -> the HF checkpoint name; KeyError for a name the table does not know."""
    name = _translate(ours, multimodal, to_hf=True)
    if name is None:
        raise KeyError(f"no checkpoint name for parameter {ours!r}")
    return name


def from_hf_name(hf: str, multimodal: bool) -> str | None:
    """HF checkpoint name -> our parameter name, or None for a tensor we do not know."""
    return _translate(hf, multimodal, to_hf=False)
