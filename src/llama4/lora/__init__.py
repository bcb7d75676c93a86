"""LoRA and QLoRA applied to a finished model from outside (module swap; the model files do not change):
wrappers over float or quantized (llama4.quant) linears and routed experts (modules.py), the config, targets
and operations on an adapted model (transform.py), and PEFT's adapter files both ways (peft_format.py).
docs/FINETUNING.md."""

from llama4.lora.modules import LoraExperts, LoraLinear
from llama4.lora.peft_format import load_adapter, read_adapter_config, save_adapter
from llama4.lora.transform import (
    KINDS,
    LoraConfig,
    apply_lora,
    candidates,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

__all__ = [
    "KINDS", "LoraConfig", "LoraExperts", "LoraLinear", "apply_lora", "candidates", "load_adapter",
    "load_lora_state_dict", "lora_modules", "lora_state_dict", "merge_and_unload", "merge_lora", "read_adapter_config",
    "save_adapter", "unmerge_lora",
]
