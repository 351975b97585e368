"""Alignment losses against the references users trust: TRL's DPOTrainer and RewardTrainer
losses on the same models and batches (converted from transformers), and line-by-line
re-implementations of the papers' equations where TRL has no trainer for the variant."""
import math
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
trl = pytest.importorskip('trl')
datasets = pytest.importorskip('datasets')

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from launch import convert  # noqa: E402
from tests.launch.test_convert import _hf_dir  # noqa: E402
from train.align_config import AlignConfig  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
  """TRL's trainers and datasets never reach the network here."""
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')


def _perturbed_copy(src, dst, scale=0.02, seed=1):
  """An HF checkpoint beside `src` with every weight moved a little: a reference model that is
  not the policy, so the DPO loss is not log 2."""
  model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  model.save_pretrained(dst)
  for f in os.listdir(src):
    if f.startswith('tokenizer') or f.endswith('.model') or f == 'special_tokens_map.json':
      shutil.copy(os.path.join(src, f), dst)
  return model


def _palmax(src, dst):
  from launch.workdir import load_model
  convert.run('hf', None, 'llama', src, dst, log=lambda *_: None)
  _, model_cfg, graphdef, params, _ = load_model(dst)
  return nnx.merge(graphdef, params)


def _fields(input_ids, completion_mask):
  """palmax pair fields from TRL's [chosen; rejected] rows: tokens gain a pad column, and the
  loss mask weighs target t + 1 (TRL's completion_mask marks the tokens themselves)."""
  ids, cm = input_ids.numpy(), completion_mask.numpy()
  b2, _ = ids.shape
  b = b2 // 2
  tokens = np.concatenate([ids, np.zeros((b2, 1), ids.dtype)], 1)
  mask = np.concatenate([cm[:, 1:], np.zeros((b2, 1), cm.dtype)], 1).astype(np.float32)
  return {'tokens': jnp.asarray(tokens[:b], jnp.int32), 'loss_mask': jnp.asarray(mask[:b]),
          'rejected_tokens': jnp.asarray(tokens[b:], jnp.int32),
          'rejected_loss_mask': jnp.asarray(mask[b:])}


def _preference_dataset(n=6):
  return datasets.Dataset.from_list([
      {'prompt': f'def f{i}(x):', 'chosen': '\n    return x' + f' * {i}' * (i % 3 + 1),
       'rejected': '\n    retur' + ' x' * (i % 2 + 1)} for i in range(n)])


@pytest.fixture(scope='module')
def dpo_models(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('dpo')
  src = _hf_dir(tmp / 'hf', 'llama', dtype=torch.float32)
  ref_src = str(tmp / 'hf_ref')
  _perturbed_copy(src, ref_src)
  return src, ref_src, _palmax(src, str(tmp / 'px')), _palmax(ref_src, str(tmp / 'px_ref')), tmp


@pytest.mark.parametrize('loss_type', ['sigmoid', 'ipo', 'hinge'])
def test_dpo_loss_equals_trls_dpo_trainer(dpo_models, loss_type):
  src, ref_src, policy, reference, tmp = dpo_models
  from train.objectives.dpo import DirectPreference
  from train.step import ModelForward, ReferenceForward
  tok = transformers.AutoTokenizer.from_pretrained(src)
  model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(ref_src, dtype=torch.float32)
  beta = 0.3
  args = trl.DPOConfig(output_dir=str(tmp / f'out_{loss_type}'), beta=beta, loss_type=[loss_type],
                       report_to=[], per_device_train_batch_size=6, max_length=64, use_cpu=True,
                       bf16=False)   # Else accelerate runs the reference under bf16 autocast.
  trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args,
                           train_dataset=_preference_dataset(), processing_class=tok)
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
  with torch.no_grad():
    want = float(trainer._compute_loss(model, batch, return_outputs=False))   # pylint: disable=protected-access
  objective = DirectPreference(None, AlignConfig(beta=beta, dpo_loss=loss_type))
  forward = ModelForward(policy, ReferenceForward(reference, adapters_off=False))
  got, metrics = objective.loss(forward, _fields(batch['input_ids'], batch['completion_mask']))
  assert abs(want - math.log(2)) > 1e-3   # The reference differs from the policy.
  assert float(got) == pytest.approx(want, rel=1e-6, abs=1e-6)   # float32 rounding of a loss ~4
  # TRL's logged rewards are the same β-scaled log-ratios.
  logged = trainer._metrics['train' if model.training else 'eval']   # pylint: disable=protected-access
  assert float(metrics['rewards/margins']) == pytest.approx(logged['rewards/margins'][-1], abs=1e-5)
  assert float(metrics['rewards/accuracies']) == pytest.approx(logged['rewards/accuracies'][-1])


def _logsigmoid(x):
  return -np.logaddexp(0.0, -x)


def test_dpo_variants_equal_the_papers_equations():
  """Conservative DPO (label smoothing, Mitchell 2023) and SimPO (Meng et al. 2024, eq. 6, with
  TRL CPOTrainer's gamma/beta form) on fixed log-probabilities, in float64 numpy."""
  from train.objectives.dpo import dpo_losses
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-40, 8, 16) for _ in range(4))
  lc, lr = rng.integers(5, 40, 16).astype(float), rng.integers(5, 40, 16).astype(float)
  beta, ls, gamma = 0.2, 0.15, 0.7
  d = (pc - rc) - (pr - rr)
  want = -(1 - ls) * _logsigmoid(beta * d) - ls * _logsigmoid(-beta * d)
  got = dpo_losses(*map(jnp.asarray, (pc, pr, rc, rr, lc, lr)),
                   AlignConfig(beta=beta, dpo_loss='sigmoid', label_smoothing=ls))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  logits = pc / lc - pr / lr - gamma / beta
  want = -_logsigmoid(beta * logits)
  got = dpo_losses(*map(jnp.asarray, (pc, pr, rc, rr, lc, lr)),
                   AlignConfig(beta=beta, dpo_loss='simpo', simpo_gamma=gamma))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  # IPO (Azar et al. 2023, eq. 17) on per-token averaged log-ratios, as TRL.
  want = ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
  got = dpo_losses(*map(jnp.asarray, (pc, pr, rc, rr, lc, lr)), AlignConfig(beta=beta, dpo_loss='ipo'))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_reward_loss_equals_trls_reward_trainer(tmp_path):
  """A transformers LlamaForSequenceClassification and its palmax conversion (the `score`
  weight becomes the reward head) give TRL's RewardTrainer loss on the same pairs."""
  from train.objectives.reward import RewardModel
  from train.step import ModelForward
  src = _hf_dir(tmp_path / 'hf', 'llama', dtype=torch.float32)
  tok = transformers.AutoTokenizer.from_pretrained(src)
  if tok.pad_token is None:
    tok.pad_token = tok.unk_token
  rm = transformers.AutoModelForSequenceClassification.from_pretrained(src, num_labels=1,
                                                                       dtype=torch.float32)
  torch.manual_seed(3)
  with torch.no_grad():
    rm.score.weight.normal_(0, 0.5)
  rm.config.pad_token_id = tok.pad_token_id
  args = trl.RewardConfig(output_dir=str(tmp_path / 'out'), report_to=[], max_length=64,
                          per_device_train_batch_size=6, use_cpu=True,
                          center_rewards_coefficient=0.01, bf16=False)
  trainer = trl.RewardTrainer(model=rm, args=args, train_dataset=_preference_dataset(),
                              processing_class=tok)
  batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
  with torch.no_grad():
    want = float(trainer.compute_loss(rm, dict(batch)))
  # palmax: the same decoder with the score weight as its reward head.
  from launch.workdir import load_model
  convert.run('hf', None, 'llama', src, str(tmp_path / 'px'), log=lambda *_: None)
  _, model_cfg, _, params, _ = load_model(str(tmp_path / 'px'))
  import dataclasses
  from model.peft import methods
  cfg = dataclasses.replace(model_cfg, heads=('reward',))
  model = methods.build_model(cfg)
  nnx.update(model, nnx.State(dict(params, reward_head=jnp.asarray(
      rm.score.weight.detach().numpy()[0]))))
  ids, attn = batch['input_ids'].numpy(), batch['attention_mask'].numpy()
  b2 = ids.shape[0]
  # palmax reads the reward at the input holding the last trained target: mark the last real
  # token of each row as that target (the one before it as its input position's neighbour).
  last = attn.sum(1) - 1
  mask = np.zeros(ids.shape, np.float32)
  mask[np.arange(b2), last - 1] = 1.0
  tokens = np.concatenate([ids, np.zeros((b2, 1), ids.dtype)], 1)
  b = b2 // 2
  fields = {'tokens': jnp.asarray(tokens[:b], jnp.int32), 'loss_mask': jnp.asarray(mask[:b]),
            'rejected_tokens': jnp.asarray(tokens[b:], jnp.int32),
            'rejected_loss_mask': jnp.asarray(mask[b:]),
            'pair': jnp.ones((b,)), 'score': jnp.zeros((b,)), 'margin': jnp.zeros((b,))}
  got, metrics = RewardModel(None, AlignConfig(reward_center=0.01)).loss(ModelForward(model),
                                                                         fields)
  assert float(got) == pytest.approx(want, abs=1e-5)
  logged = trainer._metrics['train' if rm.training else 'eval']   # pylint: disable=protected-access
  assert float(metrics['accuracy']) == pytest.approx(logged['accuracy'][-1])
  assert float(metrics['margin']) == pytest.approx(logged['margin'][-1], abs=1e-5)


@pytest.mark.parametrize('loss_type,eps_high,kl_importance,temperature', [
    ('grpo', 0.0, True, 1.0), ('bnpo', 0.28, True, 0.7), ('dr_grpo', 0.0, False, 1.0)])
def test_grpo_loss_equals_trls_grpo_trainer(dpo_models, loss_type, eps_high,
                                            kl_importance, temperature):
  """TRL's GRPOTrainer loss on the same sampled completions, advantages, sampling-time
  log-probs and reference model (k3 KL, clipped ratio, log-probs at the sampling
  temperature), within 1e-6."""
  src, ref_src, policy, reference, tmp = dpo_models
  from train.objectives.grpo import GroupRelativePolicy
  from train.step import ModelForward, ReferenceForward
  tok = transformers.AutoTokenizer.from_pretrained(src)
  model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(ref_src, dtype=torch.float32)
  b, p, c, clen = 6, 5, 9, 9
  args = trl.GRPOConfig(output_dir=str(tmp / f'grpo_{loss_type}'), report_to=[], use_cpu=True,
                        bf16=False, beta=0.04, loss_type=loss_type, epsilon=0.2,
                        epsilon_high=eps_high or 0.2, num_generations=2,
                        per_device_train_batch_size=2, max_completion_length=clen,
                        use_bias_correction_kl=kl_importance, temperature=temperature)
  trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(
      completions), args=args, train_dataset=datasets.Dataset.from_list(
          [{'prompt': 'def f(x):'}] * 4), processing_class=tok)
  gen = torch.Generator().manual_seed(0)
  prompt = torch.randint(3, 60, (b, p), generator=gen)
  completion = torch.randint(3, 60, (b, c), generator=gen)
  cmask = torch.ones(b, c, dtype=torch.long)
  for i in range(b):
    cmask[i, c - i:] = 0   # Completions of different lengths.
  ids = torch.cat([prompt, completion], 1)
  with torch.no_grad():
    def logps(m):
      lp = torch.log_softmax(m(input_ids=ids).logits[:, p - 1:-1].float() / temperature, -1)
      return torch.gather(lp, 2, completion[..., None])[..., 0]
    cur, ref = logps(model), logps(ref_model)
  old = cur + 0.3 * torch.randn(b, c, generator=gen)   # Sampled a few updates ago.
  adv = torch.randn(b, generator=gen)
  inputs = {'prompt_ids': prompt, 'prompt_mask': torch.ones_like(prompt),
            'completion_ids': completion, 'completion_mask': cmask, 'advantages': adv,
            'old_per_token_logps': old, 'ref_per_token_logps': ref,
            'num_items_in_batch': cmask.sum()}
  with torch.no_grad():
    want = float(trainer._compute_loss(model, inputs))   # pylint: disable=protected-access
  # palmax rows: prompt + completion (+ a pad column); target t + 1 is weighed at t.
  t = p + c
  tokens = np.concatenate([ids.numpy(), np.zeros((b, 1), np.int64)], 1)
  mask, old_bt = np.zeros((b, t), np.float32), np.zeros((b, t), np.float32)
  mask[:, p - 1:t - 1], old_bt[:, p - 1:t - 1] = cmask.numpy(), old.numpy()
  objective = GroupRelativePolicy(None, AlignConfig(rl_loss=loss_type, clip_eps=0.2,
                                                    clip_eps_high=eps_high, kl_coef=0.04,
                                                    kl_importance=kl_importance,
                                                    max_completion_len=clen,
                                                    temperature=temperature))
  got, metrics = objective.loss(
      ModelForward(policy, ReferenceForward(reference, adapters_off=False)),
      {'tokens': jnp.asarray(tokens, jnp.int32), 'loss_mask': jnp.asarray(mask),
       'old_logps': jnp.asarray(old_bt), 'advantages': jnp.asarray(adv.numpy())})
  assert float(got) == pytest.approx(want, rel=1e-6, abs=1e-6)
  logged = trainer._metrics['train' if model.training else 'eval']   # pylint: disable=protected-access
  assert float(metrics['kl']) == pytest.approx(logged['kl'][-1], rel=1e-5, abs=1e-6)
  assert 0 < float(metrics['clip_fraction']) < 1
