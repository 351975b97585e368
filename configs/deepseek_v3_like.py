"""DeepSeek-V3-like shape (DeepSeek-AI 2024, §2.1, §4.2): 61 layers, d 7168, first 3 layers
dense (FFN 18432), then MoE layers with 1 shared + 256 routed experts of width 2048, top-8,
sigmoid gating renormalised over the selected experts, auxiliary-loss-free bias balancing
(gamma 1e-3) plus a tiny sequence-wise balance loss (alpha 1e-4), 129,280-row vocabulary.

palmax has no multi-head latent attention (MLA) or multi-token prediction, so attention here is
plain MHA with 128 heads of 128; that makes this 688B total / 55B active instead of the paper's
671B / 37B. The MoE part (routed + shared experts, router) matches the paper's layout exactly.
"""
from configs.base import get_base, moe_section


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=129_280, d_model=7168, num_layers=61, num_heads=128, num_kv_heads=128,
                   head_dim=128, mlp_dim=18432, activation='swiglu', tie_embeddings=False,
                   rope_base=10_000.0, max_seq_len=4096, dtype='bfloat16', remat='full')
  cfg.model.moe = moe_section(
      num_experts=256, top_k=8, expert_mlp_dim=2048, num_shared_experts=1, gating='sigmoid',
      dispatch='dropless', aux_loss_coef=1e-4, router_z_loss_coef=0.0, bias_update_rate=1e-3,
      interval=1, first_dense_layers=3)
  cfg.data.seq_len = 4096
  cfg.mesh.update(data=1, fsdp=-1)
  return cfg
