import pytest

from model.config import ConfigError, ModelConfig


def test_unknown_key_is_named():
  with pytest.raises(ConfigError, match=r"unknown key\(s\) \['num_layer'\]"):
    ModelConfig.from_dict({'num_layer': 3})


@pytest.mark.parametrize('field,value,match', [
    ('num_kv_heads', 3, 'num_heads=4 must be divisible by config.model.num_kv_heads=3'),
    ('activation', 'relu', 'config.model.activation'),
    ('block', 'weird', 'config.model.block'),
    ('d_model', 0, 'config.model.d_model must be a positive int'),
    ('head_dim', 7, 'head_dim=7 must be even'),
    ('dtype', 'float16', 'config.model.dtype'),
    ('remat', 'some', 'config.model.remat'),
    ('logit_softcap', -1.0, 'logit_softcap'),
    ('layer_pattern', 'LX', 'layer_pattern'),
    ('layer_pattern', 'LG', 'config.model.sliding_window must be > 0'),
    ('rope_scaling', 'yarn', 'config.model.rope_scaling'),
    ('attn_softcap', -2.0, 'attn_softcap'),
])
def test_inconsistent_values_are_refused(field, value, match):
  with pytest.raises(ConfigError, match=match):
    ModelConfig.from_dict({'num_heads': 4, 'num_kv_heads': 1, field: value})


def test_counts_by_hand():
  c = ModelConfig(vocab_size=10, d_model=4, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=2,
                  mlp_dim=8, activation='swiglu', block='serial', tie_embeddings=True)
  attn = 4 * 2 * 2 * 2 + 4 * 1 * 2 * 2
  mlp = 3 * 4 * 8
  assert c.layer_param_count() == attn + mlp + 2 * 4
  assert c.param_count() == 10 * 4 + 2 * (attn + mlp + 8) + 4
  assert c.flops_per_token(16) == 6 * (2 * (attn + mlp + 8) + 40 + 4) + 12 * 2 * 2 * 2 * 16
  untied = ModelConfig(**{**c.__dict__, 'tie_embeddings': False})
  assert untied.flops_per_token(16) == c.flops_per_token(16)  # The input table is a lookup.


def test_layer_kinds_repeat_the_pattern():
  c = ModelConfig(num_layers=7, layer_pattern='LLG', sliding_window=8)
  assert c.layer_kinds() == 'LLGLLGL'
