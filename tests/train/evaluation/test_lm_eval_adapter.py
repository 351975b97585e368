"""An imported HF Llama checkpoint scored three ways on a 200-item multiple-choice task built from
local files: palmax's harness, `transformers` on the same token ids (log-likelihoods within
1e-4), and lm-evaluation-harness through the palmax model (the same accuracy and scores)."""
import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
lm_eval = pytest.importorskip('lm_eval')

from launch import convert  # noqa: E402
from tests.launch.test_convert import _hf_dir  # noqa: E402
from train.evaluation import harness, task as task_lib  # noqa: E402
from train.evaluation.lm import PalmaxModel  # noqa: E402
from train.evaluation.prompting import Style  # noqa: E402

N_ITEMS = 200


def _items():
  rng = np.random.default_rng(0)
  out = []
  for i in range(N_ITEMS):
    right = f'return x * {i} + {i % 7}'
    wrong = {f'return x * {int(j)} + {int(j) % 7}' for j in rng.choice(200, 6)} - {right}
    choices = sorted(wrong)[:3] + [right]
    rng.shuffle(choices)
    out.append({'query': f'def f{i}(x):', 'choices': choices, 'gold': choices.index(right)})
  return out


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp('lm_eval')
  src = _hf_dir(root / 'hf', 'llama', dtype=torch.float32)
  px = str(root / 'px')
  convert.run('hf', None, 'llama', src, px, log=lambda *_: None)
  data = root / 'mc.jsonl'
  data.write_text(''.join(json.dumps(x) + '\n' for x in _items()))
  model = PalmaxModel.load(px, serve_overrides=dict(num_slots=4, max_queue=64))
  yield src, model, str(data), root
  model.close()


@pytest.fixture(scope='module')
def ours(imported):
  _, model, data, _ = imported
  t = task_lib.Task('local_mc_parity', 'multiple_choice', task_lib.jsonl_examples(data))
  return harness.evaluate(model, [(t, Style())])['tasks']['local_mc_parity']


@pytest.mark.slow
def test_choice_loglikelihoods_equal_transformers(imported, ours):
  src, model, _, _ = imported
  hf = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
  tok = model.tokenizer
  rows = []   # (ids, context length, palmax's score) of every choice of every item
  assert len(ours['records']) == N_ITEMS
  for rec in ours['records']:
    ctx = [tok.doc_start_id] + tok.encode(rec['prompt'])
    for choice, ll in zip(rec['choices'], rec['loglikelihoods']):
      rows.append((ctx + tok.encode(' ' + choice), len(ctx), ll))
  width = max(len(ids) for ids, _, _ in rows)
  batch = torch.tensor([ids + [0] * (width - len(ids)) for ids, _, _ in rows])  # Right-padded.
  with torch.no_grad():
    logp = torch.log_softmax(hf(batch).logits[:, :-1].double(), -1)
  worst = 0.0
  for r, (ids, n_ctx, ll) in enumerate(rows):
    pos = torch.arange(n_ctx - 1, len(ids) - 1)
    want = float(logp[r, pos, torch.tensor(ids[n_ctx:])].sum())
    worst = max(worst, abs(want - ll))
  assert worst < 1e-4, worst
  # Not a degenerate task: the scores separate the choices.
  assert len({round(x, 3) for r in ours['records'] for x in r['loglikelihoods']}) > N_ITEMS


YAML = """task: palmax_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{query}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_lm_eval_through_palmax_gives_our_accuracy(imported, ours, monkeypatch):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  _, model, data, root = imported
  tasks = root / 'lm_eval_tasks'
  tasks.mkdir(exist_ok=True)
  (tasks / 'palmax_local_mc.yaml').write_text(YAML.format(data=data))
  from lm_eval.tasks import TaskManager
  from train.evaluation.lm_eval_adapter import PalmaxLM
  out = lm_eval.simple_evaluate(model=PalmaxLM(model), tasks=['palmax_local_mc'],
                                task_manager=TaskManager(include_path=str(tasks)),
                                log_samples=True, bootstrap_iters=0)
  res = out['results']['palmax_local_mc']
  assert res['acc,none'] == pytest.approx(ours['metrics']['acc']['mean'], abs=1e-12)
  assert res['acc_norm,none'] == pytest.approx(ours['metrics']['acc_norm']['mean'], abs=1e-12)
  samples = sorted(out['samples']['palmax_local_mc'], key=lambda s: s['doc_id'])
  assert len(samples) == N_ITEMS
  for s, rec in zip(samples, ours['records']):
    got = [r[0] for r in s['filtered_resps']]
    np.testing.assert_allclose(got, rec['loglikelihoods'], atol=1e-4)
  assert 0.0 < res['acc,none'] <= 1.0
