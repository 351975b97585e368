"""Group relative policy optimisation (train/objectives/grpo.py) of a workdir's model, usually
an SFT run, on its own samples (train/rl/): the bundled arithmetic task by default, rewarded by
exact match of the answer, with held-out accuracy (the `arithmetic_sft` task) evaluated along.

  python -m launch.main --config=configs/sft.py:runs/tiny --workdir=runs/arith_sft \
      --config.data.sft_task=arithmetic --config.data.seq_len=128 --config.train.steps=600 \
      --config.train.lr_end_fraction=1 --config.train.eval_tasks=arithmetic_sft
  python -m launch.main --config=configs/grpo.py:runs/arith_sft --workdir=runs/arith_grpo
  --config.align.advantage=rloo | center      RLOO / Dr. GRPO advantages
  --config.align.kl_coef=0                    no reference model (DAPO, Dr. GRPO)
  --config.align.reward=reward:runs/tiny_rm   a reward model; judge:WORKDIR for RLAIF
  --config.align.reward=rule:my_pkg.rewards:fn  your own fn(prompt, completion, reference)
  --config.data.sft_task=stdlib_functions --config.align.reward=rule:parses \
      --config.data.seq_len=192 --config.align.max_completion_len=128   the code task (beware:
      a body of `return x` parses, and GRPO finds it within 50 steps; see the README)

Prompts: train/rl/rollouts.py. config.align: train/align_config.py. configs/ppo.py is PPO.
"""
from configs import finetune


def get_config(workdir: str = ''):
  cfg = finetune.get_config(workdir)
  # A prompt is 13 tokens with the quickstart's tokenizer (18 spelt in bytes), an answer at most
  # 4 (three digits and EOS).
  cfg.data.update(source='rollouts', sft_task='arithmetic', seq_len=24,
                  attend_across_documents=False)
  # 8 prompts x 8 samples per step; DeepSeekMath's KL weight; answers are a few tokens.
  cfg.align.update(reward='rule:exact_match', group_size=8, temperature=1.0, advantage='group',
                   kl_coef=0.04, max_completion_len=6, rl_loss='grpo')
  cfg.train.update(objective='grpo', z_loss=0.0, steps=300, batch_size=64, lr=5e-5,
                   warmup_steps=10, lr_end_fraction=1.0, weight_decay=0.0, eval_every=50,
                   checkpoint_every=50, eval_batches=0, eval_tasks='arithmetic_sft',
                   eval_tasks_limit=0, log_every=10)
  # Every sample decodes at once; one 16-token prefill chunk holds a prompt (64 computes 5x the
  # tokens: a 64-sample rollout takes 1.71x [1.50-2.03] as long, interleaved on a 2-core CPU).
  cfg.serve.update(num_slots=64, prefill_chunk=16)
  cfg.sample.update(prompt='What is 347 + 58?\n', max_new_tokens=8, num_samples=2,
                    temperature=0.0)
  return cfg
