"""MoE reference shapes: built abstractly, total and active parameters from closed forms."""
import importlib

import pytest

from model import transformer
from model.config import ModelConfig


def _model_cfg(name):
  cfg = importlib.import_module(f'configs.{name}').get_config()
  return ModelConfig.from_dict(cfg.model.to_dict())


def test_glam_64e_counts():
  c = _model_cfg('glam_64e')
  d, f, e = 8192, 32768, 64
  attn = 4 * d * 128 * 128
  dense_ffn = 2 * d * f
  moe_total = e * dense_ffn + d * e          # experts + router
  moe_active = 2 * dense_ffn + d * e
  norms = 2 * d
  emb = 256_000 * d
  assert c.ffn_kinds() == 'DM' * 32           # Every other layer is MoE.
  assert c.param_count() == emb + 32 * (attn + dense_ffn + norms) + 32 * (attn + moe_total + norms) + d
  assert c.active_param_count() == emb + 32 * (attn + dense_ffn + norms) + 32 * (attn + moe_active + norms) + d
  assert c.param_count() == pytest.approx(1.2e12, rel=0.05)   # GLaM 64B/64E: "1.2T" total (here 1.15T).
  assert transformer.count_params(transformer.abstract(c)) == c.param_count()


def test_deepseek_v3_like_counts():
  c = _model_cfg('deepseek_v3_like')
  d = 7168
  expert = 3 * d * 2048
  attn = 4 * d * 128 * 128
  norms = 2 * d
  assert c.ffn_kinds() == 'D' * 3 + 'M' * 58
  assert c.layer_groups() == ((3, 'D'), (58, 'M'))
  moe_total = 256 * expert + expert + d * 256      # routed + 1 shared + router
  moe_active = 8 * expert + expert + d * 256
  emb = 2 * 129_280 * d
  assert c.param_count() == emb + 3 * (attn + 3 * d * 18432 + norms) + 58 * (attn + moe_total + norms) + d
  assert c.active_param_count() == (emb + 3 * (attn + 3 * d * 18432 + norms)
                                    + 58 * (attn + moe_active + norms) + d)
  # The routed experts alone are 58 * 256 * 44M = 653.8B of the paper's 671B.
  assert 58 * 256 * expert == pytest.approx(653.8e9, rel=1e-3)
  assert transformer.count_params(transformer.abstract(c)) == c.param_count()


def test_tiny_moe_matches_tiny_active_params():
  tiny, moe = _model_cfg('tiny'), _model_cfg('tiny_moe')
  assert moe.ffn_kinds() == 'DMDM'   # GLaM placement: every other layer (D dense, M MoE).
  router = 2 * tiny.d_model * moe.moe.num_experts
  assert moe.active_param_count() == tiny.param_count() + router
  assert moe.flops_per_token(256) == pytest.approx(tiny.flops_per_token(256) + 6 * router)
  # Each MoE layer holds 8 experts of half tiny's MLP width: 3 more dense MLPs' worth apiece.
  mlp = 3 * tiny.d_model * tiny.mlp_dim
  assert moe.param_count() == tiny.param_count() + 2 * (3 * mlp + tiny.d_model * 8)


def test_moe_interval_must_divide_layers():
  cfg = importlib.import_module('configs.tiny_moe').get_config()
  d = cfg.model.to_dict()
  d['moe']['interval'] = 3   # 4 layers are not groups of 3.
  with pytest.raises(ValueError, match=r'config\.model\.moe\.interval'):
    ModelConfig.from_dict(d)
