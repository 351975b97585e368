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


@pytest.mark.parametrize('field,value,match', [
    ('norm_eps', 0.0, 'config.model.norm_eps must be a number > 0, got 0.0'),
    ('rope_scaling_factor', -1.0, 'config.model.rope_scaling_factor must be a number > 0'),
    ('rope_low_freq_factor', 0, 'config.model.rope_low_freq_factor must be a number > 0'),
    ('rope_high_freq_factor', 'x', r"config.model.rope_high_freq_factor must be .*got 'x' \(str\)"),
    ('rope_original_max_len', 0, 'config.model.rope_original_max_len must be a positive int'),
    ('rope_base_local', 0.5, r'config.model.rope_base_local must be 0 or a number > 1'),
    ('tie_embeddings', 1, r'config.model.tie_embeddings must be a bool \(True or False\), got 1'),
    ('scale_embeddings', 'yes', 'config.model.scale_embeddings must be a bool'),
    ('norm_offset_one', None, 'config.model.norm_offset_one must be a bool'),
    ('post_norms', 0, 'config.model.post_norms must be a bool'),
    ('qk_norm', 1.0, 'config.model.qk_norm must be a bool'),
    ('query_scale_dim', 1.5, r'config.model.query_scale_dim must be an int >= 0 \(0 = head_dim\)'),
    ('sliding_window', -1, 'config.model.sliding_window must be an int >= 0'),
    ('layer_pattern', '', 'config.model.layer_pattern must be a non-empty string'),
    ('layer_pattern', 5, 'config.model.layer_pattern must be a non-empty string'),
    ('num_layers', True, r'config.model.num_layers must be a positive int, got True \(bool\)'),
    ('rope_base', float('inf'), 'config.model.rope_base must be a number > 1, got inf'),
    ('param_dtype', 'float16', r"config.model.param_dtype must be one of \('float32', 'bfloat16'\)"),
    ('moe', 'x', 'config.model.moe must be a mapping of MoE settings or None'),
])
def test_every_field_is_checked(field, value, match):
  with pytest.raises(ConfigError, match=match):
    ModelConfig.from_dict({field: value})


def test_llama3_needs_high_above_low_frequency_factor():
  ok = dict(rope_scaling='llama3', rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
  ModelConfig.from_dict(ok)
  with pytest.raises(ConfigError, match='rope_high_freq_factor=1.0 must be > '
                                        'config.model.rope_low_freq_factor=1.0'):
    ModelConfig.from_dict({**ok, 'rope_high_freq_factor': 1.0})
  ModelConfig.from_dict({**ok, 'rope_scaling': 'linear', 'rope_high_freq_factor': 1.0})  # Unused.


def test_numbers_accept_ints_and_moe_fields_are_checked():
  assert ModelConfig.from_dict({'rope_base': 10_000, 'norm_eps': 1}).rope_base == 10_000
  with pytest.raises(ConfigError, match=r'config.model.moe.renormalize must be a bool'):
    ModelConfig.from_dict({'moe': {'renormalize': 1}})
  with pytest.raises(ConfigError, match=r'config.model.moe.router_init_scale must be a number >= 0'):
    ModelConfig.from_dict({'moe': {'router_init_scale': -0.1}})


def test_unknown_keys_suggest_the_closest():
  with pytest.raises(ConfigError, match=r"\['num_layer'\] \(did you mean 'num_layers'\?\)"):
    ModelConfig.from_dict({'num_layer': 3})
  with pytest.raises(ConfigError, match=r"did you mean 'top_k'\?"):
    ModelConfig.from_dict({'moe': {'topk': 2}})
  with pytest.raises(ConfigError) as e:
    ModelConfig.from_dict({'xyzzy': 3})
  assert 'did you mean' not in str(e.value) and "known keys: ['activation'" in str(e.value)
