"""train/config_schema.py: every config field has a rule and every rule refuses bad values with
one line naming the field; every config in configs/ passes; misspelled keys get the closest one;
the command line refuses meaningless values without a traceback."""
import copy
import dataclasses
import glob
import importlib
import json
import math
import os
import re
import subprocess
import sys

import pytest

from configs.base import get_base
from model.config import MODEL_RULES, MOE_RULES, ConfigError, ModelConfig, MoEConfig
from model.config_rules import closest_key
from train import config_schema as cs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOE_CONFIGS = ('tiny_moe', 'glam_64e', 'deepseek_v3_like', 'mixtral_8x7b')


def _config(name: str = 'tiny') -> dict:
  """A real config as a plain nested dict (a ConfigDict refuses values of the wrong type)."""
  return importlib.import_module(f'configs.{name}').get_config().to_dict()


def _set(d: dict, path: str, value) -> dict:
  *parents, leaf = path.split('.')
  for p in parents:
    d = d[p]
  d[leaf] = value


def _all_fields():
  """(dotted path under config., rule, config it is tested on) for every field of the schema."""
  out = [(f'{section}.{k}', r, 'tiny') for section, rules in cs.SECTIONS.items()
         for k, r in rules.items()]
  out += [(f'model.{k}', r, 'tiny') for k, r in MODEL_RULES.items()]
  out += [(f'model.moe.{k}', r, 'tiny_moe') for k, r in MOE_RULES.items()]
  return out


def _bad_values(rule) -> list:
  """Values `rule` must refuse: wrong types (bools are not ints), then out of range or choices."""
  if rule.choices:
    out = ['no-such-choice', 5, None]
  elif rule.kind == 'bool':
    out = [1, 0, 'True', None]
  elif rule.kind in ('int', 'number'):
    out = ['3', None, True] + ([1.5] if rule.kind == 'int' else [math.nan, math.inf])
    step = 1 if rule.kind == 'int' else 0.5
    if rule.lo is not None:
      out += [rule.lo if rule.lo_open else rule.lo - step, rule.lo - 2 * step]
    if rule.hi is not None:
      out += [rule.hi if rule.hi_open else rule.hi + step]
    # Values the rule lets through on purpose (mesh sizes: -1 = fill).
    out = [v for v in out if isinstance(v, (str, bool)) or v is None or v not in rule.also]
  elif rule.kind == 'str':
    out = [5, None] + ([''] if rule.lo else [])
  elif rule.kind == 'strs':
    out = [5, [1], None]
  elif rule.kind == 'section':
    out = [5, 'x', None]
  elif rule.kind == 'pairs':
    out = [5, [('batch',)], [(1, 'data')], None]
  else:
    raise AssertionError(f'no bad values for rule kind {rule.kind!r}: extend this test')
  return [v for v in out if not (v is None and rule.none_ok)]


def _refused(cfg, field: str) -> str:
  with pytest.raises(ConfigError) as e:
    cs.validate(cfg)
  msg = str(e.value)
  assert '\n' not in msg and f'config.{field}' in msg, msg
  return msg


# ---- (a) The whole schema, one field at a time -------------------------------------------------


@pytest.mark.parametrize('field,rule,base', _all_fields(), ids=[f[0] for f in _all_fields()])
def test_every_field_refuses_bad_values_naming_the_field(field, rule, base):
  bad = _bad_values(rule)
  assert bad
  for value in bad:
    cfg = _config(base)
    _set(cfg, field, value)
    msg = _refused(cfg, field)
    assert rule.allowed() in msg or 'mapping of MoE settings' in msg, msg
  if not field.startswith('model.'):   # Model fields have dataclass defaults; the rest must be set.
    cfg = _config(base)
    *parents, leaf = field.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    del node[leaf]
    assert 'is missing' in _refused(cfg, field)


def test_the_schema_covers_every_key_and_every_dataclass_field():
  base = get_base()
  assert set(base.keys()) == set(cs.TOP_LEVEL + cs.OPTIONAL)
  from model.peft.methods import PeftConfig
  assert set(cs.PEFT_RULES) == {f.name for f in dataclasses.fields(PeftConfig)}
  for path, rules in cs.SECTIONS.items():
    node = base
    for p in path.split('.'):
      node = node[p]
    assert set(node.keys()) == set(rules), path
    for k, r in rules.items():   # A nested section has its own table, so the walk reaches it.
      assert r.kind != 'section' or f'{path}.{k}' in cs.SECTIONS, f'{path}.{k}'
  assert set(MODEL_RULES) == {f.name for f in dataclasses.fields(ModelConfig)}
  assert set(MOE_RULES) == {f.name for f in dataclasses.fields(MoEConfig)}
  # The model section is the dataclass's (less `moe`, which only MoE configs have).
  assert set(base.model.keys()) | {'moe'} == set(MODEL_RULES)
  assert ModelConfig.from_dict(base.model.to_dict()) == ModelConfig()
  for name in MOE_CONFIGS:   # Every MoE field is overridable on every MoE config.
    assert set(_config(name)['model']['moe']) == set(MOE_RULES), name


def test_rules_state_what_is_allowed():
  assert cs.TRAIN_RULES['b1'].allowed() == 'a number in [0, 1)'
  assert cs.SAMPLE_RULES['top_p'].allowed() == 'a number in (0, 1] (1 = off)'
  assert cs.MESH_RULES['data'].allowed() == '-1 or a positive int (-1 = the devices left)'
  assert cs.TRAIN_RULES['nan_policy'].allowed() == "one of ('stop', 'skip')"
  assert cs.TRAIN_RULES['on_corrupt'].allowed() == "one of ('previous', 'stop')"
  cfg = _config()
  _set(cfg, 'train.lr', -1.0)
  assert _refused(cfg, 'train.lr') == 'config.train.lr must be a number >= 0, got -1.0'
  cfg = _config()
  _set(cfg, 'train.b2', 1)   # Ints are numbers.
  assert _refused(cfg, 'train.b2') == 'config.train.b2 must be a number in [0, 1), got 1'
  cfg = _config()
  _set(cfg, 'train.verify_checkpoints', 1)   # Bools are not ints, nor ints bools.
  assert 'must be a bool (True or False), got 1 (int)' in _refused(cfg, 'train.verify_checkpoints')
  cfg = _config()
  _set(cfg, 'train.steps', True)
  assert 'must be a positive int, got True (bool)' in _refused(cfg, 'train.steps')
  cfg = _config()
  _set(cfg, 'train.lr', 1)   # An int where a float is expected is fine.
  cs.validate(cfg)


# ---- Cross-field checks ---------------------------------------------------------------------


@pytest.mark.parametrize('changes,field,match', [
    ({'train.warmup_steps': 301}, 'train.warmup_steps',
     'warmup_steps=301 exceeds config.train.steps=300'),
    ({'train.schedule_steps': 40}, 'train.warmup_steps',
     'warmup_steps=50 exceeds config.train.schedule_steps=40'),
    ({'train.grad_accum': 3}, 'train.batch_size', 'batch_size=16 is not divisible by '
     'config.train.grad_accum=3'),
    ({'data.seq_len': 512}, 'data.seq_len', 'seq_len=512 exceeds config.model.max_seq_len=256'),
    ({'data.source': 'text'}, 'data.paths', "source='text' reads files"),
    ({'data.source': 'jsonl', 'data.paths': []}, 'data.paths', "source='jsonl' reads files"),
    ({'data.source': 'tfds'}, 'data.tfds_name', "source='tfds'"),
    ({'data.tokenizer.vocab_size': 9000}, 'data.tokenizer.vocab_size',
     'exceeds config.model.vocab_size=8192'),
    ({'model.vocab_size': 256, 'data.tokenizer.vocab_size': 256}, 'data.tokenizer.vocab_size',
     'too small to train a tokenizer'),
    ({'mesh.fsdp': -1}, 'mesh', "only one axis may be -1 (fill), got ['data', 'fsdp']"),
    ({'mesh.rules': [['batch', 'model']]}, 'mesh.rules', "unknown mesh axis 'model'"),
    ({'mesh.rules': [['batch', 5]]}, 'mesh.rules', "'batch' -> 5"),
    ({'sample.top_k': 9000}, 'sample.top_k', 'exceeds config.model.vocab_size=8192'),
    ({'model.rope_scaling': 'llama3', 'model.rope_high_freq_factor': 1.0}, 'model.rope_high',
     'must be > config.model.rope_low_freq_factor=1.0'),
])
def test_cross_field_checks(changes, field, match):
  cfg = _config()
  _set(cfg, 'train.steps', 300)        # The figures in the messages above, whatever tiny.py says.
  _set(cfg, 'train.warmup_steps', 50)
  for path, value in changes.items():
    _set(cfg, path, value)
  assert match in _refused(cfg, field)


def test_cross_field_checks_allow_what_makes_sense():
  cfg = _config()
  for path, value in {'train.warmup_steps': 300, 'train.schedule_steps': 1000,
                      'model.vocab_size': 256, 'data.tokenizer.vocab_size': 256,
                      'data.tokenizer.path': '/some/spm.model',   # A given tokenizer may be small.
                      'mesh.preset': 'fsdp', 'mesh.fsdp': -1,     # A preset picks its own fill.
                      'sample.top_k': 256, 'train.lr': 0.0}.items():
    _set(cfg, path, value)
  cs.validate(cfg)


def test_sections_missing_unknown_and_extra():
  cfg = _config()
  del cfg['pipeline']
  assert 'config.pipeline is missing' in _refused(cfg, 'pipeline')
  cfg = _config()
  cfg['trian'] = {'steps': 3}
  assert _refused(cfg, 'trian') == 'config.trian is not a section; did you mean train?'
  cfg = _config()
  cfg['train']['lrr'] = 1.0
  assert _refused(cfg, 'train.lrr') == 'config.train.lrr is not a key; did you mean lr?'
  cfg = _config()
  cfg['model']['num_layer'] = 3
  assert "did you mean 'num_layers'?" in _refused(cfg, 'model')
  cfg = _config()
  cfg['sweep'] = {'budgets': 'whatever'}   # Validated by train/scaling/plan.py, not here.
  cs.validate(cfg)


# ---- (b) Every config in configs/ passes ------------------------------------------------------


def _config_modules():
  files = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')) +
                 glob.glob(os.path.join(ROOT, 'configs', 'sweeps', '*.py')))
  mods = [os.path.relpath(f, ROOT)[:-3].replace(os.sep, '.') for f in files]
  # finetune, sft, sft_lora, reward, dpo, grpo and ppo take a source workdir (tested below).
  return [m for m in mods if m.rsplit('.', 1)[1] not in ('__init__', 'base', 'finetune', 'sft',
                                                          'sft_lora', 'reward', 'dpo', 'grpo',
                                                          'ppo')]


@pytest.mark.parametrize('module', _config_modules())
def test_every_config_passes(module):
  cfg = importlib.import_module(module).get_config()
  cs.validate(cfg)                          # As a ConfigDict ...
  cs.validate(json.loads(cfg.to_json()))    # ... and as read back from a workdir's config.json.
  if 'sweep' in cfg:   # Every point of a sweep is an ordinary run, validated as such.
    from train.scaling import plan
    for point in plan.plan_sweep(cfg):
      cs.validate(plan.point_config(cfg, point))


def test_base_and_finetune_pass(tmp_path):
  cs.validate(get_base())
  src = importlib.import_module('configs.tiny_moe').get_config()
  (tmp_path / 'config.json').write_text(src.to_json())
  cfg = importlib.import_module('configs.finetune').get_config(str(tmp_path))
  cs.validate(cfg)
  sft = importlib.import_module('configs.sft').get_config(str(tmp_path))
  cs.validate(sft)
  assert (sft.data.source, sft.train.objective) == ('sft', 'sft')
  lora = importlib.import_module('configs.sft_lora').get_config(str(tmp_path))
  cs.validate(lora)
  assert (lora.peft.method, lora.train.objective) == ('lora', 'sft')
  assert ModelConfig.from_dict(cfg.model.to_dict()) == ModelConfig.from_dict(src.model.to_dict())
  for name, objective in (('reward', 'reward'), ('dpo', 'dpo')):
    aligned = importlib.import_module(f'configs.{name}').get_config(str(tmp_path))
    cs.validate(aligned)
    cs.validate(json.loads(aligned.to_json()))
    assert (aligned.data.source, aligned.train.objective) == ('preference', objective)
  assert ModelConfig.from_dict(importlib.import_module('configs.reward').get_config(
      str(tmp_path)).model.to_dict()).heads == ('reward',)
  for name in ('grpo', 'ppo'):   # RL on the policy's own samples (train/rl/).
    rl = importlib.import_module(f'configs.{name}').get_config(str(tmp_path))
    cs.validate(rl)
    cs.validate(json.loads(rl.to_json()))
    assert (rl.data.source, rl.train.objective) == ('rollouts', name)
    assert rl.train.batch_size % rl.align.group_size == 0


def test_alignment_objectives_name_what_they_need(tmp_path):
  src = importlib.import_module('configs.tiny').get_config()
  (tmp_path / 'config.json').write_text(src.to_json())
  dpo = importlib.import_module('configs.dpo').get_config(str(tmp_path))
  bad = [({'train.init_from': ''}, 'needs config.train.init_from'),
         ({'peft.method': 'prompt'}, "cannot use config.peft.method='prompt'"),
         ({'data.source': 'sft'}, "the objective needs data.source='preference'"),
         ({'align.dpo_loss': 'kto'}, 'config.align.dpo_loss must be one of'),
         ({'align.beta': 0.0}, 'config.align.beta must be a number > 0')]
  for change, message in bad:
    cfg = copy.deepcopy(dpo)
    for k, v in change.items():
      section, key = k.split('.')
      cfg[section][key] = v
    with pytest.raises(ConfigError, match=re.escape(message)):
      cs.validate(cfg)
  simpo = copy.deepcopy(dpo)
  simpo.align.dpo_loss, simpo.train.init_from = 'simpo', ''   # Reference-free.
  cs.validate(simpo)
  reward = importlib.import_module('configs.reward').get_config(str(tmp_path))
  reward.model.heads = ()
  with pytest.raises(ConfigError, match="needs config.model.heads to include 'reward'"):
    cs.validate(reward)
  reward.model.heads = ('reward', 'bogus')
  with pytest.raises(ConfigError, match='config.model.heads'):
    cs.validate(reward)


# ---- (c) Closest keys -------------------------------------------------------------------------


def test_closest_key():
  fields = [f.name for f in dataclasses.fields(ModelConfig)]
  assert closest_key('num_layer', fields) == 'num_layers'
  assert closest_key('NUM_LAYERS', fields) == 'num_layers'
  assert closest_key('qknorm', fields) == 'qk_norm'
  assert closest_key('lrr', cs.TRAIN_RULES) == 'lr'
  assert closest_key('temprature', cs.SAMPLE_RULES) == 'temperature'
  assert closest_key('xyzzy', fields) is None
  assert closest_key('anything', []) is None


# ---- Sampling parameters ----------------------------------------------------------------------


@pytest.mark.parametrize('flag,value', [
    ('temperature', -1.0), ('top_p', 1.5), ('top_p', 0.0), ('top_k', -1), ('max_new_tokens', -3),
    ('num_samples', 0), ('seed', -1), ('prompt', 5), ('temperature', True)])
def test_validate_sample_names_the_flag(flag, value):
  kw = dict(get_base().sample)
  kw[flag] = value
  with pytest.raises(ConfigError) as e:
    cs.validate_sample(kw, flags=[flag])
  msg = str(e.value)
  assert msg.startswith(f'--{flag} must be ') and '\n' not in msg and repr(value) in msg
  with pytest.raises(ConfigError, match=rf'^config\.sample\.{flag} must be '):
    cs.validate_sample(kw)   # Not from a flag: named as the config field.


def test_validate_sample_accepts_good_values_and_names_unknown_ones():
  cs.validate_sample(dict(get_base().sample))
  cs.validate_sample({'temperature': 0, 'top_p': 1, 'top_k': 0, 'num_samples': 1})   # Subsets.
  with pytest.raises(ConfigError, match='^--temprature is not a sampling parameter; did you mean '
                                        'temperature'):
    cs.validate_sample({'temprature': 1.0}, flags=['temprature'])
  # A config may say 0 samples (launch/main.py then skips sampling); sampling 0 is refused.
  cfg = _config()
  _set(cfg, 'sample.num_samples', 0)
  cs.validate(cfg)


# ---- (d) The command line ---------------------------------------------------------------------


def _main(tmp_path, *overrides):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'launch.main', '--config=configs/tiny.py',
                         f'--workdir={tmp_path / "w"}', *overrides], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize('overrides,line', [
    (('--config.train.lr=-1',), 'error: config.train.lr must be a number >= 0, got -1.0'),
    # qk_norm is a key of every config now (it was refused as unknown on tiny); steps=0 is not.
    (('--config.model.qk_norm=True', '--config.train.steps=0'),
     'error: config.train.steps must be a positive int, got 0'),
    (('--config.train.nan_policy=halt',),
     "error: config.train.nan_policy must be one of ('stop', 'skip'), got 'halt'"),
    (('--config.model.num_layer=3',),
     'error: bad config override: config.model.num_layer is not a key; did you mean num_layers?'),
    (('--config.train.lrr=1',),
     'error: bad config override: config.train.lrr is not a key; did you mean lr?'),
])
def test_cli_refuses_in_one_line(tmp_path, overrides, line):
  r = _main(tmp_path, *overrides)
  assert r.returncode != 0, r.stdout[-2000:]
  assert 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines() == [line], r.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_eval_tasks_are_checked_before_any_work():
  from configs.base import get_base
  from train import config_schema
  cfg = get_base()
  cfg.train.eval_tasks = 'arithmetic:3shot,stdlib_mc'
  config_schema.validate(cfg)
  cfg.train.eval_tasks = 'arithmetic,nope'
  with pytest.raises(ConfigError, match=r"config.train.eval_tasks: unknown task 'nope'"):
    config_schema.validate(cfg)
