"""A reward model from a workdir's model (an SFT run, or an HF checkpoint converted with
launch.convert): its decoder plus a scalar head (model/heads.py) trained on preference pairs with
the Bradley–Terry loss (train/objectives/reward.py); pairwise accuracy on the held-out pairs is
reported at every evaluation. The bundled task by default, or your JSONL:

  python -m launch.main --config=configs/reward.py:runs/tiny_sft --workdir=runs/tiny_rm
  python -m launch.main --config=configs/reward.py:runs/llama --workdir=runs/llama_rm \
      --config.data.pref_task= --config.data.paths='("prefs.jsonl",)' \
      --config.data.pref_val_paths='("prefs_val.jsonl",)'

Records (pairs, rankings, pointwise scores): train/preference_data.py. LoRA reward models:
--config.peft.method=lora (the head trains with the adapters).
"""
from configs import finetune


def get_config(workdir: str = ''):
  cfg = finetune.get_config(workdir)
  cfg.model.heads = ('reward',)
  cfg.data.update(source='preference', pref_task='stdlib_preferences')
  # 400 steps decaying to a tenth: 0.940 validation / 0.921 test pairwise accuracy on the
  # bundled pairs (README); 150 steps stop at 0.88.
  cfg.train.update(objective='reward', z_loss=0.0, steps=400, batch_size=16, lr=3e-4,
                   warmup_steps=10, lr_end_fraction=0.1, weight_decay=0.0, eval_every=100,
                   checkpoint_every=100, eval_batches=0)
  cfg.sample.update(num_samples=0)   # A reward model scores; it does not sample.
  return cfg
