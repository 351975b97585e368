"""LoRA fine-tuning of a workdir's model on demonstration records (configs/sft.py's data and
objective; model/peft/): rank 8 on every attention weight, the base frozen (in bfloat16) and
only the adapters checkpointed. QLoRA stores the frozen base in 4-bit NF4 (or int4 / int8):

  python -m launch.main --config=configs/sft_lora.py:runs/tiny --workdir=runs/tiny_lora
  python -m launch.main --config=configs/sft_lora.py:runs/tiny --workdir=runs/tiny_qlora \
      --config.peft.quant=nf4

Other methods on the same task: --config.peft.method=adapter (Houlsby bottlenecks) or
--config.peft.method=prompt (prompt tuning; --config.peft.prompt_tokens).
"""
from configs import sft


def get_config(workdir: str = ''):
  cfg = sft.get_config(workdir)
  # Every attention weight at rank 8: about 1% of the tiny model's parameters (all linear
  # weights, as QLoRA does, would be 2.9%). The frozen base is kept in bfloat16, as LoRA users
  # load it; --config.peft.quant=nf4 stores it in 4 bits instead.
  cfg.peft.update(method='lora', lora_rank=8, lora_alpha=16.0, lora_targets=r'attn/w_(q|k|v|o)',
                  base_dtype='bfloat16')
  cfg.train.update(lr=3e-3)   # Adapters start at zero and take a larger step than full tuning.
  return cfg
