"""Parameter-efficient fine-tuning as tree surgery on a built Decoder.

  lora.py     LoRA / rsLoRA on the `Linear` seam, merging, adapter-only parameter trees
  adapter.py  Houlsby bottleneck adapters after output projections
  prompt.py   prompt tuning: trainable virtual tokens
  hf.py       LoRA adapters in the Hugging Face PEFT library's format
  methods.py  `config.peft` -> PeftConfig, the method registry, build/abstract/merge

QLoRA is `method='lora'` with `quant` set: the frozen base weights are quantized first
(model/quant.py) and the adapters wrap the quantized weights.
"""
from model.peft.lora import (Layout, LoraConfig, LoraLinear, LoraParam, apply_lora, layout,
                             load_lora_params, lora_params, lora_sites, merge_lora, sites,
                             targeted)
from model.peft.methods import (METHODS, PeftConfig, abstract_model, apply_peft, build_model,
                                merge_peft, prefix_ids, trainable_pattern)

__all__ = ['Layout', 'LoraConfig', 'LoraLinear', 'LoraParam', 'apply_lora', 'layout',
           'load_lora_params', 'lora_params', 'lora_sites', 'merge_lora', 'sites', 'targeted',
           'METHODS', 'PeftConfig', 'abstract_model', 'apply_peft', 'build_model', 'merge_peft',
           'prefix_ids', 'trainable_pattern']
