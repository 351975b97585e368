"""Parameter and FLOP counting for scaling laws (train/scaling/counting.py)."""
import importlib

import pytest

from model.config import ConfigError, ModelConfig
from train.scaling import counting


def _small(**overrides) -> ModelConfig:
  base = dict(vocab_size=1000, d_model=64, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16,
              mlp_dim=256, activation='swiglu', block='serial', tie_embeddings=True)
  base.update(overrides)
  return ModelConfig.from_dict(base)


def test_counts_by_hand():
  # Per layer: q,o 64*4*16*2 = 8192; k,v (1 KV head) 64*16*2 = 2048; SwiGLU 64*256*3 = 49152;
  # two RMSNorm scales 128 -> 59,520. Total: table 64,000 + 2 layers + final norm 64 = 183,104.
  c = counting.param_counts(_small())
  assert (c.total, c.embedding, c.non_embedding) == (183_104, 64_000, 119_104)
  assert (c.active, c.active_non_embedding) == (c.total, c.non_embedding)   # Dense.
  # 6N + 12*L*H*Q*T = 6*183,104 + 12*2*4*16*128 = 1,098,624 + 196,608.
  assert counting.training_flops_per_token(_small(), 128) == 1_295_232
  assert counting.attention_flops_per_token(_small(), 128) == 196_608
  assert counting.training_flops(_small(), 128, 1000) == 1_295_232_000


def test_untied_table_is_counted_as_params_but_not_flops():
  tied, untied = _small(), _small(tie_embeddings=False)
  assert counting.param_counts(untied).embedding == 2 * counting.param_counts(tied).embedding
  assert counting.param_counts(untied).total == counting.param_counts(tied).total + 64_000
  # The input lookup costs nothing; the (now separate) output projection costs what the tied one did.
  assert counting.training_flops_per_token(untied, 128) == counting.training_flops_per_token(tied, 128)


@pytest.mark.parametrize('overrides', [{}, dict(tie_embeddings=False), dict(block='parallel'),
                                       dict(activation='gelu', num_kv_heads=4)])
def test_dense_flops_match_model_config(overrides):
  cfg = _small(**overrides)
  assert counting.training_flops_per_token(cfg, 256) == cfg.flops_per_token(256)
  # Also from the config sections the launcher passes around.
  assert counting.training_flops_per_token(cfg.to_dict(), 256) == cfg.flops_per_token(256)


def test_palm_540b_size_and_mfu():
  """PaLM Table 1 (540.35B, embeddings 4.72B) and App. B: 238.3K tok/s on 6144 chips = 46.2% MFU."""
  palm = ModelConfig.from_dict(dict(
      vocab_size=256_000, d_model=18432, num_layers=118, num_heads=48, num_kv_heads=1, head_dim=256,
      mlp_dim=4 * 18432, activation='swiglu', block='parallel', tie_embeddings=True))
  c = counting.param_counts(palm)
  assert c.total == 540_356_474_880
  assert c.embedding == pytest.approx(4.72e9, rel=1e-3)
  assert c.non_embedding == pytest.approx(535.64e9, rel=1e-4)
  mfu = counting.training_flops_per_token(palm, 2048) * 238.3e3 / (6144 * 275e12)
  assert mfu == pytest.approx(0.4623, abs=5e-4)
  # The attention term is ~1.1% of the FLOPs at T = 2048.
  share = counting.attention_flops_per_token(palm, 2048) / counting.training_flops_per_token(palm, 2048)
  assert share == pytest.approx(0.011, abs=0.001)


def test_palm_8b_non_embedding():
  cfg = importlib.import_module('configs.palm_8b').get_config()
  c = counting.param_counts(cfg.model)
  assert c.total == pytest.approx(8.63e9, rel=1e-3)
  assert c.non_embedding == c.total - 256_000 * 4096


def test_deepseek_m_by_hand_and_against_palm():
  # DeepSeek LLM 7B shape at 4096 context: 72*30*4096^2 + 12*30*4096*4096.
  ds7b = _small(vocab_size=102_400, d_model=4096, num_layers=30, num_heads=32, num_kv_heads=32,
                head_dim=128, mlp_dim=11008)
  assert counting.deepseek_flops_per_token(ds7b, 4096) == 42_278_584_320
  # For a plain 4d MLP with heads*head_dim = d, M is PaLM's count minus the embedding and norms:
  # 6 * (12 L d^2) + 12 L d T.
  plain = _small(activation='gelu', mlp_dim=256, num_kv_heads=4)
  norms = 2 * 64 * 2 + 64
  palm = counting.training_flops_per_token(plain, 512)
  assert counting.deepseek_flops_per_token(plain, 512) == palm - 6 * (64_000 + norms)
  assert counting.kaplan_non_embedding_params(plain) == counting.param_counts(plain).non_embedding - norms


def test_chinchilla_table3_rows_are_6nd():
  """Hoffmann et al. 2022 Table 3: (params, tokens) -> FLOPs with C = 6ND (tokens are printed
  to 2-3 significant figures: 67B x 1.5T is 6.03e23 against the table's 5.76e23)."""
  for n, d, c in [(400e6, 8.0e9, 1.92e19), (1e9, 20.2e9, 1.21e20), (10e9, 205.1e9, 1.23e22),
                  (67e9, 1.5e12, 5.76e23), (175e9, 3.7e12, 3.85e24)]:
    assert counting.chinchilla_flops(n, d) == pytest.approx(c, rel=0.05)


def test_moe_counts_active_parameters():
  cfg = importlib.import_module('configs.mixtral_8x7b').get_config()
  model = ModelConfig.from_dict(cfg.model.to_dict())
  c = counting.param_counts(cfg.model)
  assert c.total == 46_702_792_704 and c.active == model.active_param_count()
  assert c.active == pytest.approx(12.88e9, rel=1e-3)          # FACTS.md: 46.70B / 12.88B.
  assert c.active_non_embedding == c.active - 2 * 32_000 * 4096
  fpt = counting.training_flops_per_token(cfg.model, 4096)
  assert fpt == model.flops_per_token(4096)
  untied_input = 32_000 * 4096
  assert fpt == 6 * (c.active - untied_input) + 12 * 32 * 32 * 128 * 4096


def test_bad_input_is_named():
  with pytest.raises(ValueError, match='seq_len'):
    counting.training_flops_per_token(_small(), 0)
  with pytest.raises(ConfigError, match='num_layer'):
    counting.param_counts({'num_layer': 3})
  with pytest.raises(TypeError, match='ModelConfig'):
    counting.param_counts(42)
