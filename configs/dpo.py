"""Direct preference optimisation of a workdir's model (usually an SFT run) against a frozen copy
of itself (train/objectives/dpo.py): the bundled stdlib preference task by default, with the
task's own metric (the fraction of generated function bodies that parse, exact match) evaluated
alongside the DPO loss, reward accuracy and margin.

  python -m launch.main --config=configs/dpo.py:runs/tiny_sft --workdir=runs/tiny_dpo
  python -m launch.main --config=configs/dpo.py:runs/tiny_sft --workdir=runs/tiny_dpo_lora \
      --config.peft.method=lora          # LoRA-DPO: the reference is the base, adapters off
  --config.align.dpo_loss=ipo | hinge | simpo   --config.align.beta=0.1

Records: train/preference_data.py. config.align: train/align_config.py.
"""
from configs import finetune


def get_config(workdir: str = ''):
  cfg = finetune.get_config(workdir)
  cfg.data.update(source='preference', pref_task='stdlib_preferences')
  cfg.align.update(beta=0.1, dpo_loss='sigmoid')
  cfg.train.update(objective='dpo', z_loss=0.0, steps=100, batch_size=16, lr=1e-4,
                   warmup_steps=10, lr_end_fraction=0.0, weight_decay=0.0, eval_every=50,
                   checkpoint_every=50, eval_batches=0,
                   eval_tasks='stdlib_functions', eval_tasks_limit=32)
  cfg.sample.update(prompt='def median(data):\n    """Return the median (middle value) of '
                    'numeric data."""\n', max_new_tokens=64, num_samples=2, temperature=0.0)
  return cfg
