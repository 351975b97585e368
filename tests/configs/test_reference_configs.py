"""Reference model shapes are built abstractly (no memory) and match published sizes."""
import importlib

import pytest

from model import transformer
from model.config import ModelConfig

# Published totals (shared/FACTS.md; Llama 2 paper/model card; Gemma report), relative tolerance.
PUBLISHED = {
    'palm_8b': (8.63e9, 0.001),      # PaLM Table 1.
    'gemma_2b': (2.51e9, 0.002),     # Gemma 1 2B (HF/report: 2.51B incl. 256,128-row embedding).
    'llama2_7b': (6.74e9, 0.001),    # Llama 2 7B.
    # Exact totals of the released checkpoints (their model cards / HF configs).
    'gemma2_2b': (2_614_341_888, 0),
    'gemma3_1b': (999_885_952, 0),
    'llama3_8b': (8_030_261_248, 0),
    'mistral_7b': (7_241_732_096, 0),
    'mixtral_8x7b': (46_702_792_704, 0),
}
# Parameters one token uses (MoE: top-k experts + router), where it differs from the total.
PUBLISHED_ACTIVE = {
    'mixtral_8x7b': (12.9e9, 0.002),   # Jiang et al. 2024: "12.9B active"; exactly 12,879,925,248.
}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_reference_param_counts(name):
  cfg = importlib.import_module(f'configs.{name}').get_config()
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  built = transformer.count_params(transformer.abstract(model_cfg))
  assert built == model_cfg.param_count()
  want, rtol = PUBLISHED[name]
  assert built == pytest.approx(want, rel=rtol, abs=0)
  want_active, rtol = PUBLISHED_ACTIVE.get(name, (built, 0))
  assert model_cfg.active_param_count() == pytest.approx(want_active, rel=rtol, abs=0)


@pytest.mark.parametrize('name', ['tiny', 'small'])
def test_training_configs_are_valid(name):
  cfg = importlib.import_module(f'configs.{name}').get_config()
  model_cfg = ModelConfig.from_dict(cfg.model.to_dict())
  assert cfg.data.tokenizer.vocab_size == model_cfg.vocab_size
  assert cfg.data.seq_len <= model_cfg.max_seq_len


def test_vocab_override_reaches_tokenizer():
  cfg = importlib.import_module('configs.tiny').get_config()
  cfg.model.vocab_size = 1234
  assert cfg.data.tokenizer.vocab_size == 1234


def test_palm_flops_per_token_matches_appendix_b():
  # PaLM App. B: 6N + 12 L H Q T with N = all parameters (tied embedding counted once).
  m = ModelConfig.from_dict(importlib.import_module('configs.palm_8b').get_config().model.to_dict())
  want = 6 * m.param_count() + 12 * 32 * 16 * 256 * 2048
  assert m.flops_per_token(2048) == pytest.approx(want, rel=1e-9)
