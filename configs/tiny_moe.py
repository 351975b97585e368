"""Tiny sparse-MoE decoder: configs/tiny.py with every other FFN replaced by 8 experts, top-2.

Each expert is half as wide as tiny's MLP (384 vs 768), so a token uses the same FFN FLOPs as in
tiny (2 x 384) while an MoE layer holds 4x the FFN parameters: the comparison the MoE papers make
(Switch §3, GLaM §4) at equal active parameters and tokens. MoE sits on layers 2 and 4 (GShard /
GLaM placement, `interval=2`), layers 1 and 3 keep tiny's dense MLP.

  python -m launch.main --config=configs/tiny_moe.py --workdir=runs/tiny_moe

Measured against configs/tiny.py on the bundled corpus, 300 steps x 16 x 256 tokens, seed 0
(validation loss, nats, at steps 50..300; `--config.train.seed=1` for the second seed):
  dense tiny           6.969 6.339 5.988 5.776 5.648 5.562
  tiny_moe             6.956 6.344 5.998 5.782 5.637 5.546   (max/min expert load 1.49, 1.42)
  seed 1: dense 5.550, tiny_moe 5.546 (load 1.26, 1.37) at step 300: a narrow win
  MoE on every layer   7.059 6.437 6.074 5.840 5.699 5.599   (loses: each expert weight sees a
                                                              quarter of the tokens; 0.025 behind
                                                              still after 600 steps)
"""
from configs.base import moe_section
from configs.tiny import get_config as get_tiny


def get_config():
  cfg = get_tiny()
  cfg.model.moe = moe_section(
      num_experts=8, top_k=2, expert_mlp_dim=384,
      gating='softmax_topk', renormalize=True,   # GShard top-2: the kept pair sums to 1.
      routed_scaling_factor=1.0, num_shared_experts=0, router_init_scale=0.1,
      # Dropless (MegaBlocks): with capacity dispatch per sequence at factor 1.25, 15-20% of
      # token-slots were still dropped at step 150 (per-row imbalance is far larger than the
      # batch's). On XLA:CPU both modes run at about 1-1.3x a dense FFN's time
      # (python -m launch.bench_moe).
      dispatch='dropless', capacity_factor=1.25, capacity_group='sequence',
      # Switch balance loss at 3x its paper default plus DeepSeek-V3's bias update at 2x: with
      # 1e-2 / 1e-3 the worst layer ended at max/min load 2.04 (MoE on every layer, 300 steps).
      # ST-MoE z-loss at its default.
      aux_loss_coef=3e-2, router_z_loss_coef=1e-3, bias_update_rate=2e-3,
      interval=2, first_dense_layers=0)
  # The AdamW recipe the comparison above was measured with (tiny.py has since moved to Muon).
  cfg.model.scan_layers = True
  cfg.train.update(steps=300, optimizer='adamw', lr=3e-3, warmup_steps=50, lr_end_fraction=0.1,
                   weight_decay=0.1, eval_every=100, checkpoint_every=100)
  return cfg
