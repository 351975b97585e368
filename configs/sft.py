"""Supervised fine-tuning of a workdir's model (a palmax run, or an HF checkpoint imported with
launch.convert) on demonstration records: the bundled stdlib task by default, or your JSONL.

  python -m launch.main --config=configs/sft.py:runs/tiny --workdir=runs/tiny_sft
  python -m launch.main --config=configs/sft.py:runs/llama --workdir=runs/llama_sft \
      --config.data.sft_task= --config.data.paths='("chats.jsonl",)' \
      --config.data.sft_val_paths='("chats_val.jsonl",)'

Records, chat formats, packing and masking: train/sft_data.py. The base's parameters start the
run (fresh optimizer, step 0), its tokenizer and chat template are used as they are.
"""
from configs import finetune


def get_config(workdir: str = ''):
  cfg = finetune.get_config(workdir)
  cfg.data.update(source='sft', sft_task='stdlib_functions', attend_across_documents=False)
  # The loss TRL's SFTTrainer reports: mean cross-entropy of completion tokens, no z-loss.
  cfg.train.update(objective='sft', z_loss=0.0, steps=120, batch_size=16, lr=1e-3,
                   warmup_steps=10, lr_end_fraction=0.0, weight_decay=0.0, eval_every=40,
                   checkpoint_every=40, eval_batches=0,
                   eval_tasks='stdlib_functions', eval_tasks_limit=32)
  cfg.sample.update(prompt='def median(data):\n    """Return the median (middle value) of '
                    'numeric data."""\n', max_new_tokens=64, num_samples=2, temperature=0.0)
  return cfg
