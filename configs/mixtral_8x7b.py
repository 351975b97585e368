"""Mixtral 8x7B (Jiang et al. 2024, arXiv 2401.04088): Mistral 7B's shape (32 layers, d 4096, 32
heads / 8 KV heads of 128, untied 32k embeddings, RoPE base 1e6) with every FFN a sparse MoE of 8
SwiGLU experts of width 14336, top-2, softmax over the two kept router logits (§2.1). Attention and
embeddings are shared, so 46.70B parameters in total and 12.88B active per token (not 8 x 7B)."""
from configs.base import get_base, moe_section


def get_config():
  cfg = get_base()
  cfg.model.update(vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                   head_dim=128, mlp_dim=14336, activation='swiglu', tie_embeddings=False,
                   rope_base=1_000_000.0, norm_eps=1e-5, max_seq_len=32_768, dtype='bfloat16',
                   remat='full')
  cfg.model.moe = moe_section(
      num_experts=8, top_k=2, expert_mlp_dim=14336, gating='topk_softmax', dispatch='dropless',
      # The released config.json: router_aux_loss_coef 0.02, summed over the k=2 choices by HF;
      # palmax averages over them, hence 0.04 for the same loss. No router z-loss.
      aux_loss_coef=0.04, router_z_loss_coef=0.0, interval=1, first_dense_layers=0)
  cfg.data.seq_len = 8192
  cfg.mesh.update(data=1, fsdp=-1)
  return cfg
