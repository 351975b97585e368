"""What every training-config value may be: one rule per field, checked before anything is built.

`validate(cfg)` checks a whole config (the sections `configs/base.py:get_base()` makes): each
field's type and range or choices (model.config.Rule), unknown keys (with the closest known one),
missing keys, and the cross-field checks that need no device mesh. The model section is checked by
`ModelConfig.from_dict` (its rules are model/config.py's MODEL_RULES and MOE_RULES); mesh-dependent
checks (batch shards, expert divisibility, pipeline fit) stay in train/trainer.py:check_config and
model/pipeline.py. `validate_sample(d)` checks sampling parameters (launch/sample.py,
launch/workdir.py). Every error is a `ConfigError` of one line naming the field, the value and
what is allowed.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from model import pipeline, sharding
from model.config import ModelConfig
from model.config_rules import (BOOL, ConfigError, Rule, choice, closest_key, nonneg_int, number,
                                positive_int)
from train import corpus, objectives, tokenizer
from train.align_config import ADVANTAGES, DPO_LOSSES, RL_LOSSES

SEED = nonneg_int()

DATA_RULES = {
    'source': choice(corpus.SOURCES + ('sft', 'preference', 'rollouts')),
    'paths': Rule('strs', note='files or globs, for source text or jsonl'),
    'text_key': Rule('str', lo=1),
    'tfds_name': Rule('str', note='required for source tfds'),
    'tfds_split': Rule('str', lo=1),
    'tfds_data_dir': Rule('str', none_ok=True, note="'' or None = the TFDS default"),
    'val_fraction': number(ge=0, lt=1),
    'max_docs': nonneg_int('0 = all'),
    'seq_len': positive_int(),
    'seed': SEED,
    'attend_across_documents': BOOL,
    'sft_task': Rule('str', note="a bundled SFT task (train/sft_tasks.py), '' = data.paths"),
    'sft_val_paths': Rule('strs', note='JSONL validation records for source sft'),
    'sft_packing': BOOL,
    'sft_overflow': choice(('truncate', 'drop')),
    'sft_tfds_val_split': Rule('str', note="a split of data.tfds_name, '' = none"),
    'pref_task': Rule('str', note="a bundled preference task (train/preference_tasks.py), '' = "
                      'data.paths'),
    'pref_val_paths': Rule('strs', note='JSONL validation records for source preference'),
    'tokenizer': Rule('section'),
}
TOKENIZER_RULES = {
    'vocab_size': positive_int('follows config.model.vocab_size'),
    'model_type': choice(tokenizer.MODEL_TYPES),
    'path': Rule('str', note="'' = train one on the training split"),
    'train_bytes': nonneg_int('0 = all the training text'),
}
TRAIN_RULES = {
    'steps': positive_int(),
    'batch_size': positive_int(),
    'grad_accum': positive_int(),
    # 0 leaves the parameters as they start (tests/launch/test_convert.py trains at lr 0 to show
    # that init_from loads the converted weights exactly); below 0 is gradient ascent.
    'lr': number(ge=0),
    'optimizer': choice(('adamw', 'muon')), 'muon_lr': number(ge=0),
    'warmup_steps': nonneg_int(),
    'lr_end_fraction': number(ge=0, le=1),
    'b1': number(ge=0, lt=1),
    'b2': number(ge=0, lt=1),
    'eps': number(gt=0),
    'weight_decay': number(ge=0),
    'clip_norm': number(ge=0, note='0 = no clipping'),
    'z_loss': number(ge=0, note='0 = off'),
    'loss_chunk_tokens': nonneg_int('0 = materialised logits'),
    'log_every': positive_int(),   # The trainer logs at step % log_every == 0.
    'eval_every': nonneg_int('0 = only at the end'),
    'eval_batches': nonneg_int('0 = the whole validation split'),
    'eval_tasks': Rule('str', note="comma-separated task specs, e.g. 'arithmetic:3shot'"),
    'eval_tasks_limit': nonneg_int('0 = every example'),
    'checkpoint_every': nonneg_int('0 = only at the end'),
    'keep_checkpoints': positive_int(),
    'async_checkpoints': BOOL,
    'nan_policy': choice(('stop', 'skip')),
    'seed': SEED,
    'peak_flops': number(ge=0, note='0 = measure the matmul peak'),
    'tensorboard': BOOL,
    'init_from': Rule('str', note="a workdir, '' = random init"),
    'on_corrupt': choice(('previous', 'stop')),
    'verify_checkpoints': BOOL,
    'schedule_steps': nonneg_int('0 = config.train.steps when the run starts'),
    # Checked against the registry in _cross_checks: objectives registered later count too.
    'objective': Rule('str', lo=1, note="a registered objective, e.g. 'lm'"),
    'trainable': Rule('str', note="a regular expression over parameter paths, '' = all"),
}
MESH_RULES = {
    **{a: Rule('int', lo=1, also=(-1,), note='-1 = the devices left') for a in sharding.MESH_AXES},
    'preset': choice(('',) + tuple(sorted(sharding.PRESETS)), note="'' = these sizes and rules"),
    'dcn': Rule('section'),
    # Pairs (logical name, mesh axes); what they name is checked by sharding.check_rules.
    'rules': Rule('pairs'),
}
DCN_RULES = {a: positive_int() for a in sharding.MESH_AXES}
PIPELINE_RULES = {
    'stages': nonneg_int('0 = the mesh pipeline axis size'),
    'microbatches': nonneg_int('0 = stages'),
    'schedule': choice(pipeline.SCHEDULES),
    'circular_repeats': positive_int(),
}
SAMPLE_RULES = {
    'prompt': Rule('str'),
    'max_new_tokens': positive_int(),
    'num_samples': nonneg_int('0 = none after training'),   # launch/main.py skips sampling at 0.
    'temperature': number(ge=0, note='0 = greedy'),
    'top_k': nonneg_int('0 = off'),
    'top_p': number(gt=0, le=1, note='1 = off'),
    'seed': SEED,
}

SERVE_RULES = {
    'num_slots': positive_int(), 'page_size': positive_int(),
    'num_pages': nonneg_int('0 = auto: every slot at full context, twice'),
    'prefill_chunk': positive_int(), 'max_queue': positive_int(), 'prefix_cache': BOOL,
    'max_cached_pages': nonneg_int('0 = no bound but the pool'),
    'max_top_logprobs': nonneg_int(), 'max_n': positive_int(),
}

ALIGN_RULES = {   # train/align_config.py says what each means.
    'beta': number(gt=0), 'dpo_loss': choice(DPO_LOSSES),
    'label_smoothing': number(ge=0, lt=0.5), 'simpo_gamma': number(ge=0),
    'reward_center': number(ge=0, note='0 = off'),
    'rl_loss': choice(RL_LOSSES), 'clip_eps': number(gt=0, lt=1),
    'clip_eps_high': number(ge=0, note='0 = clip_eps'), 'kl_coef': number(ge=0, note='0 = off'),
    'kl_importance': BOOL,
    'max_completion_len': positive_int(),
    'reward': Rule('str', lo=1, note="'rule:NAME', 'reward:WORKDIR' or 'judge:WORKDIR[:RUBRIC]'"),
    'reward_timeout_s': number(gt=0), 'group_size': positive_int(),
    'temperature': number(gt=0, le=2), 'advantage': choice(ADVANTAGES),
    'updates_per_rollout': positive_int(), 'vf_coef': number(ge=0), 'vf_clip': number(gt=0),
    'gamma': number(gt=0, le=1), 'gae_lambda': number(ge=0, le=1),
}
PEFT_RULES = {
    'method': Rule('str', note="'' (full fine-tuning), lora, adapter or prompt"),
    'quant': Rule('str', note="'', int8, int4 or nf4"),
    'base_dtype': Rule('str', note="'' (as trained) or bfloat16"),
    'quant_group_size': positive_int(), 'quant_targets': Rule('str', lo=1),
    'lora_rank': positive_int(), 'lora_alpha': number(gt=0), 'lora_dropout': number(ge=0, lt=1),
    'lora_targets': Rule('str', lo=1), 'rslora': BOOL,
    'adapter_dim': positive_int(), 'adapter_targets': Rule('str', lo=1),
    'prompt_tokens': positive_int(),
}

# Every section (dotted path under `config.`) and its rules; `model` and `model.moe` are
# model/config.py's MODEL_RULES and MOE_RULES, applied by ModelConfig.from_dict.
SECTIONS = {
    'data': DATA_RULES, 'data.tokenizer': TOKENIZER_RULES, 'train': TRAIN_RULES,
    'mesh': MESH_RULES, 'mesh.dcn': DCN_RULES, 'pipeline': PIPELINE_RULES, 'sample': SAMPLE_RULES,
    'serve': SERVE_RULES, 'peft': PEFT_RULES, 'align': ALIGN_RULES,
}
TOP_LEVEL = ('model', 'data', 'train', 'mesh', 'pipeline', 'sample', 'serve')
# Sections added later: checked when present (configs saved before them lack them).
OPTIONAL = ('peft', 'align')
# Top-level sections other modules validate: tolerated here, not checked.
OTHER_SECTIONS = {'sweep': 'train/scaling/plan.py'}
# train/tokenizer.py:train_tokenizer's floor: 256 byte pieces, specials and whitespace symbols.
MIN_TRAINED_VOCAB = 300


def _keys(section: Any) -> list[str]:
  return list(section.keys())   # A ConfigDict is no Mapping, but has keys() and [].


def _lookup(cfg: Any, path: str) -> Any:
  node = cfg
  for part in path.split('.'):
    node = node[part]
  return node


def check_section(section: Any, rules: Mapping[str, Rule], where: str) -> None:
  """Checks one section: no unknown keys (the closest known one is suggested), every key of
  `rules` present, each value by its rule."""
  Rule('section').check(where, section)
  keys = _keys(section)
  for k in keys:
    if k not in rules:
      hint = closest_key(k, rules)
      raise ConfigError(f'{where}.{k} is not a key' + (f'; did you mean {hint}?' if hint else
                                                       f'; {where} has: {", ".join(rules)}'))
  for k, rule in rules.items():
    if k in keys:
      rule.check(f'{where}.{k}', section[k])
    else:
      raise ConfigError(f'{where}.{k} is missing; expected {rule.allowed()} (configs/base.py '
                        'get_base() sets every key)')


def validate(cfg: Any) -> None:
  """Checks the whole config `cfg` (a ConfigDict or nested dict); raises ConfigError, one line."""
  top = _keys(cfg)
  unknown = [k for k in top if k not in TOP_LEVEL + OPTIONAL and k not in OTHER_SECTIONS]
  if unknown:
    hint = closest_key(unknown[0], TOP_LEVEL)
    raise ConfigError(f'config.{unknown[0]} is not a section' + (
        f'; did you mean {hint}?' if hint else f'; sections: {", ".join(TOP_LEVEL)}'))
  for name in TOP_LEVEL:
    if name not in top:
      raise ConfigError(f'config.{name} is missing; configs start from configs/base.py get_base()')
  model = cfg['model']
  Rule('section').check('config.model', model)
  model_cfg = ModelConfig.from_dict(model.to_dict() if hasattr(model, 'to_dict') else model)
  for path, rules in SECTIONS.items():
    if path in OPTIONAL and path not in top:
      continue
    check_section(_lookup(cfg, path), rules, f'config.{path}')
  _check_mesh_rules(_lookup(cfg, 'mesh.rules'))
  _cross_checks(cfg, model_cfg)


def validate_sample(d: Mapping[str, Any], prefix: str = 'config.sample.',
                    flags: Iterable[str] = ()) -> None:
  """Checks sampling parameters (any subset of config.sample's keys) before sampling. Keys in
  `flags` came from command-line flags and are named `--key`, the others `prefix + key`."""
  flags = set(flags)

  def name(k: str) -> str:
    return f'--{k}' if k in flags else f'{prefix}{k}'

  for k in d:
    if k not in SAMPLE_RULES:
      hint = closest_key(k, SAMPLE_RULES)
      raise ConfigError(f'{name(k)} is not a sampling parameter' +
                        (f'; did you mean {hint}?' if hint else f'; known: {", ".join(SAMPLE_RULES)}'))
  for k, rule in SAMPLE_RULES.items():
    if k in d:
      # Drawing zero samples is meaningless here (config.sample.num_samples=0 only tells
      # launch/main.py to skip sampling after training).
      (positive_int() if k == 'num_samples' else rule).check(name(k), d[k])


def _check_mesh_rules(rules: Any) -> None:
  for name, axes in rules:
    ok = axes is None or isinstance(axes, str) or (
        isinstance(axes, (list, tuple)) and all(isinstance(a, str) for a in axes))
    if not ok:
      raise ConfigError(f'config.mesh.rules: {name!r} -> {axes!r}; expected a mesh axis name, a '
                        'list of them, or None (replicated)')
  try:
    sharding.check_rules(rules)
  except sharding.ShardingError as e:   # Same message, as the config error it is.
    raise ConfigError(str(e)) from None


def _cross_checks(cfg: Any, model_cfg: ModelConfig) -> None:
  """Consistency between fields that needs no device mesh."""
  t, data, mesh, sample = (cfg[k] for k in ('train', 'data', 'mesh', 'sample'))
  objective = objectives.get(t['objective'])   # One line naming the registered ones if unknown.
  records = data['source'] if data['source'] in ('sft', 'preference', 'rollouts') else ''
  if objective.data_source != records:
    need = {'': 'a text corpus (stdlib, text, jsonl, tfds)', 'sft': "data.source='sft'",
            'preference': "data.source='preference'",
            'rollouts': "data.source='rollouts' (samples of the policy itself, train/rl/)"}
    raise ConfigError(f"config.data.source={data['source']!r} with config.train.objective="
                      f"{t['objective']!r}: the objective needs {need[objective.data_source]}")
  _check_align(cfg, model_cfg, objective)
  if 'peft' in _keys(cfg):
    _check_peft(cfg)
  if t.get('eval_tasks'):
    from train.evaluation import task as task_lib
    try:
      task_lib.parse_specs(t['eval_tasks'])
    except ValueError as e:
      raise ConfigError(f'config.train.eval_tasks: {e}') from None
    if cfg['pipeline'].get('stages'):
      raise ConfigError('config.train.eval_tasks needs an unpipelined model '
                        '(config.pipeline.stages=0); evaluate the checkpoints with launch.eval')
  if t['batch_size'] % t['grad_accum']:   # Wording as train/trainer.py:check_config.
    raise ConfigError(f'config.train.batch_size={t["batch_size"]} is not divisible by '
                      f'config.train.grad_accum={t["grad_accum"]}')
  horizon = ('config.train.schedule_steps', t['schedule_steps']) if t['schedule_steps'] else (
      'config.train.steps', t['steps'])
  if t['warmup_steps'] > horizon[1]:
    raise ConfigError(f'config.train.warmup_steps={t["warmup_steps"]} exceeds {horizon[0]}='
                      f'{horizon[1]} (the learning-rate schedule\'s length); use at most {horizon[1]}')
  if data['seq_len'] > model_cfg.max_seq_len:
    raise ConfigError(f'config.data.seq_len={data["seq_len"]} exceeds '
                      f'config.model.max_seq_len={model_cfg.max_seq_len}')
  source, paths = data['source'], data['paths']
  if source in ('text', 'jsonl') and not paths:
    raise ConfigError(f'config.data.paths is empty but config.data.source={source!r} reads files; '
                      "give files or globs, e.g. --config.data.paths='(\"a/*.txt\",)'")
  if source == 'tfds' and not data['tfds_name']:
    raise ConfigError("config.data.tfds_name must be set when config.data.source='tfds'")
  tok = data['tokenizer']
  if tok['vocab_size'] > model_cfg.vocab_size:
    raise ConfigError(f'config.data.tokenizer.vocab_size={tok["vocab_size"]} exceeds '
                      f'config.model.vocab_size={model_cfg.vocab_size} (token ids past the embedding)')
  if not tok['path'] and tok['vocab_size'] < MIN_TRAINED_VOCAB:
    raise ConfigError(f'config.data.tokenizer.vocab_size={tok["vocab_size"]} is too small to train a '
                      f'tokenizer (at least {MIN_TRAINED_VOCAB}: 256 byte pieces, specials and '
                      'whitespace symbols); raise config.model.vocab_size or set '
                      'config.data.tokenizer.path')
  if not mesh['preset']:
    fill = [a for a in sharding.MESH_AXES if mesh[a] == -1]
    if len(fill) > 1:
      raise ConfigError(f'config.mesh: only one axis may be -1 (fill), got {fill}')
  if sample['top_k'] > model_cfg.vocab_size:
    raise ConfigError(f'config.sample.top_k={sample["top_k"]} exceeds '
                      f'config.model.vocab_size={model_cfg.vocab_size}')


def _check_align(cfg: Any, model_cfg: ModelConfig, objective) -> None:
  """What the alignment objectives need: a reward head, a reference model."""
  from train.align_config import AlignConfig
  name, t = cfg['train']['objective'], cfg['train']
  if name == 'reward' and 'reward' not in model_cfg.heads:
    raise ConfigError("config.train.objective='reward' needs config.model.heads to include "
                      "'reward' (the scalar head, model/heads.py); configs/reward.py sets it")
  align = cfg['align'] if 'align' in _keys(cfg) else None
  a = AlignConfig.from_config({'align': align} if align else None)
  if objective.data_source == 'rollouts':
    _check_rollouts(cfg, model_cfg, a)
  if not objective.wants_reference(a):
    return
  method = cfg['peft']['method'] if 'peft' in _keys(cfg) else ''
  if not t['init_from']:
    raise ConfigError(f"config.train.objective={name!r} needs config.train.init_from: the model "
                      'it starts from is also its frozen reference')
  if method == 'prompt':
    raise ConfigError(f"config.train.objective={name!r} cannot use config.peft.method='prompt': "
                      'its reference (the base without the soft prompt) reads other inputs')
  if cfg['pipeline'].get('stages'):
    raise ConfigError(f'config.train.objective={name!r} needs an unpipelined model '
                      '(config.pipeline.stages=0)')


def _check_rollouts(cfg: Any, model_cfg: ModelConfig, a) -> None:
  """What an RL run (train/rl/) needs: whole groups per batch, a known reward, room to sample."""
  from train import rewards
  t, name = cfg['train'], cfg['train']['objective']
  if t['batch_size'] % a.group_size:
    raise ConfigError(f'config.train.batch_size={t["batch_size"]} (samples per step) is not '
                      f'divisible by config.align.group_size={a.group_size} (samples per prompt)')
  if a.group_size < 2 and name != 'ppo':
    raise ConfigError(f'config.align.group_size={a.group_size}: a group-relative advantage '
                      'needs at least 2 samples per prompt')
  try:
    rewards.check_spec(a.reward)
  except ValueError as e:
    raise ConfigError(f'config.align.reward: {e}') from None
  if name == 'ppo' and 'value' not in model_cfg.heads:
    raise ConfigError("config.train.objective='ppo' needs config.model.heads to include "
                      "'value' (the value head, model/heads.py); configs/ppo.py sets it")
  if cfg['pipeline'].get('stages'):
    raise ConfigError(f'config.train.objective={name!r} samples through the serving engine, '
                      'which needs an unpipelined model (config.pipeline.stages=0)')
  if cfg['data']['seq_len'] < 8:
    raise ConfigError(f'config.data.seq_len={cfg["data"]["seq_len"]} leaves no room for a '
                      'prompt and its completion')


def _check_peft(cfg: Any) -> None:
  """config.peft's values (model/peft/methods.py names the field) and what they need."""
  from model.peft.methods import PeftConfig
  p = PeftConfig.from_config(cfg['peft'])
  try:
    p.validate()
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not p.method:
    return
  t = cfg['train']
  if t['optimizer'] != 'adamw':
    raise ConfigError(f"config.peft.method={p.method!r} trains with AdamW; config.train.optimizer="
                      f"{t['optimizer']!r} (Muon) is for full-rank hidden matrices")
  if cfg['pipeline'].get('stages'):
    raise ConfigError(f'config.peft.method={p.method!r} needs an unpipelined model '
                      '(config.pipeline.stages=0)')
