"""GLaM (64B/64E) shape (Du et al. 2022, Table 4): 64 layers, d 8192, 128 heads of 128, FFN
32768, 64 experts with top-2 gating on every other layer, 256k vocabulary.

Built here with 2-matrix GELU FFNs and tied embeddings: 1.15T total / 88.0B active parameters
against the paper's 1.2T / 96.6B (GLaM's gated dense FFNs and per-layer relative position
biases are not modelled; tests/configs/test_moe_configs.py pins the closed-form counts).
"""
from configs.base import get_base, moe_section


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=256_000, d_model=8192, num_layers=64, num_heads=128, num_kv_heads=128,
                   head_dim=128, mlp_dim=32768, activation='gelu', tie_embeddings=True,
                   max_seq_len=1024, dtype='bfloat16', remat='full')
  cfg.model.moe = moe_section(
      num_experts=64, top_k=2, expert_mlp_dim=32768, gating='softmax_topk', renormalize=False,
      dispatch='capacity', capacity_factor=2.0, capacity_group='sequence',  # GShard/GLaM: 2.0.
      aux_loss_coef=1e-2, router_z_loss_coef=0.0, interval=2, first_dense_layers=0)
  cfg.data.seq_len = 1024
  cfg.mesh.update(data=1, fsdp=-1)
  return cfg
