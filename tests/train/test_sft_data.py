"""SFT records, chat formats and packing: formats, masks, errors, and packing changes nothing."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.inference.chat import PalmaxChat
from train import sft_data


@pytest.fixture(scope='module')
def tok(trained_workdir):
  from train.tokenizer import load_workdir_tokenizer
  return load_workdir_tokenizer(trained_workdir[0])


def _flat(segs):
  return [t for s, _ in segs for t in s], [w for s, w in segs for _ in s]


def test_the_three_record_formats(tok):
  chat = PalmaxChat(tok)
  pc = sft_data.record_segments({'prompt': 'def f(x):', 'completion': ' return x'}, tok, chat, 'a')
  assert pc == [([tok.doc_start_id] + tok.encode('def f(x):'), False),
                (tok.encode(' return x') + [tok.eos_id], True)]
  alpaca = sft_data.record_segments({'instruction': 'Add.', 'input': '1 2', 'output': '3'}, tok,
                                    chat, 'b')
  assert tok.decode(alpaca[0][0]) == sft_data.ALPACA_INPUT.format(instruction='Add.', input='1 2')
  plain = sft_data.record_segments({'instruction': 'Add.', 'output': '3'}, tok, chat, 'b')
  assert tok.decode(plain[0][0]) == sft_data.ALPACA.format(instruction='Add.')
  msgs = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
          {'role': 'assistant', 'content': 'Hello'}, {'role': 'user', 'content': 'Bye'},
          {'role': 'assistant', 'content': 'Ciao'}]
  segs = sft_data.record_segments({'messages': msgs}, tok, chat, 'c')
  trained = [tok.decode(s) for s, w in segs if w]
  assert trained == ['Hello', 'Ciao'] and all(s[-1] == tok.eos_id for s, w in segs if w)
  untrained = ''.join(tok.decode(s) for s, w in segs if not w)
  assert untrained == ('<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n<|user|>\nBye\n'
                       '<|assistant|>\n')
  # Serving renders the conversation so far exactly as training saw it.
  ids, _ = _flat(segs[:-1])
  assert chat.prompt_ids(msgs[:-1]) == ids


@pytest.mark.parametrize('rec,message', [
    ({'prompt': 'x'}, '"completion" must be a non-empty string'),
    ({'prompt': '', 'completion': 'y'}, '"prompt" must be a non-empty string'),
    ({'messages': [{'role': 'robot', 'content': 'x'}]}, r"messages\[0\]: role must be one of"),
    ({'messages': [{'role': 'user', 'content': ' '}]}, r'messages\[0\] \(user\): content'),
    ({'messages': [{'role': 'user', 'content': 'hi'}]}, 'no assistant message'),
    ({'messages': []}, 'non-empty list'),
    ({'text': 'x'}, 'expected "prompt" \\+ "completion"'),
    ([1, 2], 'expected a JSON object'),
    ({'instruction': 'x', 'output': 'y', 'input': 3}, '"input" must be a string'),
])
def test_bad_records_name_the_file_and_line(tok, tmp_path, rec, message):
  path = tmp_path / 'data.jsonl'
  path.write_text(json.dumps({'prompt': 'a', 'completion': 'b'}) + '\n\n' + json.dumps(rec) + '\n')
  (good, _), (bad, where) = sft_data.read_jsonl(str(path))
  assert where == f'{path}:3'
  with pytest.raises(ValueError, match=message) as e:
    sft_data.record_segments(bad, tok, PalmaxChat(tok), where)
  assert str(e.value).startswith(f'{path}:3')


def test_read_jsonl_errors(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text('{"prompt": "a", "completion": "b"}\n{nope\n')
  with pytest.raises(ValueError, match=r'd.jsonl:2: not JSON'):
    sft_data.read_jsonl(str(path))
  with pytest.raises(FileNotFoundError, match='SFT data file'):
    sft_data.read_jsonl(str(tmp_path / 'missing.jsonl'))


def _ex(n_prompt, n_completion, base=10):
  return [(list(range(base, base + n_prompt)), False),
          (list(range(base + 100, base + 100 + n_completion)), True)]


def test_packing_keeps_examples_whole_and_counts_overflow():
  exs = [_ex(3, 2), _ex(4, 4), _ex(2, 3), _ex(3, 12), _ex(20, 5), _ex(9, 0)]
  p = sft_data.pack(exs, seq_len=9, pad_id=0)               # Rows of 10 tokens.
  rows = p.tokens.reshape(-1, 10)
  # 5 + 8 tokens do not share a row, nor 8 + 5, nor 5 + 10 (the 15-token example cut to 10,
  # keeping 7 trained tokens); cut to its prompt, the 25-token one has nothing left to learn.
  assert p.stats == dict(examples=4, rows=4, truncated=2, dropped=2, trained_tokens=2 + 4 + 3 + 7)
  seg = p.segment_ids.reshape(-1, 10)
  assert seg[0].tolist() == [1] * 5 + [0] * 5
  assert p.positions.reshape(-1, 10)[0].tolist() == [0, 1, 2, 3, 4, 0, 0, 0, 0, 0]
  assert p.loss.reshape(-1, 10)[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
  assert rows[0, 5:].tolist() == [0] * 5
  with pytest.raises(ValueError, match='sft_overflow must be one of'):
    sft_data.pack(exs, 9, 0, overflow='cut')
  dropped = sft_data.pack(exs, 9, 0, overflow='drop')
  assert dropped.stats['dropped'] == 3 and dropped.stats['truncated'] == 0
  unpacked = sft_data.pack(exs[:3], 9, 0, packing=False)
  assert unpacked.stats['rows'] == 3


def _per_example_losses(model, p):
  """Mean cross-entropy of each example's trained tokens, keyed by the example's token ids."""
  tokens = p.tokens.reshape(-1, p.window)
  seg, pos = p.segment_ids.reshape(-1, p.window), p.positions.reshape(-1, p.window)
  loss = p.loss.reshape(-1, p.window)
  logits = model.forward(jnp.asarray(tokens[:, :-1]), segment_ids_BT=jnp.asarray(seg[:, :-1]),
                         positions_BT=jnp.asarray(pos[:, :-1]))[0]
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
  ce = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  out = {}
  for r in range(len(tokens)):
    for s in set(seg[r, 1:].tolist()) - {0}:
      m = (seg[r, 1:] == s) & (loss[r, 1:] > 0)
      if m.any():
        key = tuple(tokens[r][seg[r] == s].tolist())
        out[key] = float((ce[r] * m).sum() / m.sum())
  return out


def test_packed_and_unpacked_give_the_same_per_example_losses(trained_workdir, tok):
  from launch.workdir import load_model
  _, model_cfg, graphdef, params, _ = load_model(trained_workdir[0])
  model = nnx.merge(graphdef, params)
  rng = np.random.default_rng(0)
  recs = [{'prompt': f'def func_{i}(x):', 'completion': '\n    return x' + ' + 1' * int(k)}
          for i, k in enumerate(rng.integers(1, 6, 24))]
  exs = [sft_data.record_segments(r, tok, PalmaxChat(tok), str(i)) for i, r in enumerate(recs)]
  seq = model_cfg.max_seq_len
  packed = sft_data.pack(exs, seq, tok.pad_id)
  alone = sft_data.pack(exs, seq, tok.pad_id, packing=False)
  assert packed.stats['rows'] < alone.stats['rows'] == 24
  a, b = _per_example_losses(model, packed), _per_example_losses(model, alone)
  assert a.keys() == b.keys() and len(a) > 10
  worst = max(abs(a[k] - b[k]) for k in a)
  assert worst <= 1e-6, worst


def test_records_from_a_prepared_tfds_dataset(tmp_path, tok):
  """data.tfds_name: prompt/completion text features and chat `messages` (a TFDS Sequence of
  role/content dicts) become the same records as JSONL; nothing is downloaded."""
  import ml_collections
  import tensorflow_datasets as tfds

  class PalmaxTestSft(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'prompt': tfds.features.Text(), 'completion': tfds.features.Text(),
          'messages': tfds.features.Sequence({'role': tfds.features.Text(),
                                              'content': tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(3), 'validation': self._generate_examples(1)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'prompt': f'def f{i}(x):\n', 'completion': f'    return x + {i}\n',
                  'messages': [{'role': 'user', 'content': f'q{i}'},
                               {'role': 'assistant', 'content': f'a{i}'}]}

  data_dir = str(tmp_path / 'tfds')
  PalmaxTestSft(data_dir=data_dir, file_format='array_record').download_and_prepare()
  d = ml_collections.ConfigDict(dict(sft_task='', tfds_name='palmax_test_sft', tfds_split='train',
                                     tfds_data_dir=data_dir, sft_tfds_val_split='validation',
                                     paths=()))
  records = sft_data.load_records(d)
  assert [len(records[s]) for s in ('train', 'validation')] == [3, 1]
  rec, where = sorted(records['train'], key=lambda x: x[0]['prompt'])[1]
  assert where.startswith('palmax_test_sft/train[')
  assert rec['messages'] == [{'role': 'user', 'content': 'q1'},
                             {'role': 'assistant', 'content': 'a1'}]
  # Both formats train: the messages record through the chat format, prompt/completion as is.
  chat = PalmaxChat(tok)
  with_messages = sft_data.record_segments(rec, tok, chat, where)
  plain = sft_data.record_segments({'prompt': rec['prompt'], 'completion': rec['completion']},
                                   tok, chat, where)
  assert with_messages == chat.segments(rec['messages'])
  assert tok.decode(plain[1][0]).startswith('    return x + 1')
  d.sft_tfds_val_split = 'nope'
  with pytest.raises(ValueError, match=r"palmax_test_sft.*split 'nope'"):
    sft_data.load_records(d)
