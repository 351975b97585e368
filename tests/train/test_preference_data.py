"""Preference records -> units: every format, only responses trained, bad input named in one
line, and the bundled task's pairs really differ in the task's own metric."""
import json

import numpy as np
import pytest

from model.inference.chat import PalmaxChat
from train import preference_data as pd, preference_tasks


@pytest.fixture(scope='module')
def tok(trained_workdir):
  from train.tokenizer import load_workdir_tokenizer
  return load_workdir_tokenizer(trained_workdir[0])


def _trained_text(tok, segs):
  return tok.decode([t for s, w in segs for t in s if w])


def test_pairs_rankings_scores_and_chats(tok):
  chat = PalmaxChat(tok)
  [(c, r, meta)] = pd.record_units({'prompt': 'def f(x):', 'chosen': ' return x',
                                    'rejected': ' retur', 'margin': 2}, tok, chat, 'a')
  assert _trained_text(tok, c) == ' return x' and _trained_text(tok, r) == ' retur'
  assert c[0] == ([tok.doc_start_id] + tok.encode('def f(x):'), False)
  assert meta == {'score': 0.0, 'margin': 2.0}
  units = pd.record_units({'prompt': 'p', 'ranking': ['best', 'mid', 'worst']}, tok, chat, 'b')
  assert [(_trained_text(tok, c), _trained_text(tok, r)) for c, r, _ in units] == [
      ('best', 'mid'), ('best', 'worst'), ('mid', 'worst')]
  [(c, r, meta)] = pd.record_units({'prompt': 'p', 'completion': 'q', 'score': 0.25}, tok, chat,
                                   'c')
  assert r is None and meta['score'] == 0.25
  # Two whole conversations: the shared messages are the prompt, earlier answers not trained.
  talk = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'},
          {'role': 'user', 'content': 'Bye'}]
  [(c, r, _)] = pd.record_units({'chosen': talk + [{'role': 'assistant', 'content': 'Ciao'}],
                                 'rejected': talk + [{'role': 'assistant', 'content': 'No'}]},
                                tok, chat, 'd')
  assert _trained_text(tok, c) == 'Ciao' and _trained_text(tok, r) == 'No'
  ids = [t for s, _ in c for t in s]
  assert ids[:len(chat.prompt_ids(talk))] == chat.prompt_ids(talk)   # Rendered as serving does.
  [(c2, _, _)] = pd.record_units({'prompt': talk, 'chosen': 'Ciao', 'rejected': 'No'}, tok, chat,
                                 'e')
  assert c2 == c


@pytest.mark.parametrize('rec,message', [
    ({'prompt': 'x', 'chosen': 'y'}, 'needs both "chosen" and "rejected"'),
    ({'prompt': 'x', 'chosen': 'y', 'rejected': 'y'}, 'are the same response'),
    ({'chosen': 'y', 'rejected': 'z'}, '"prompt" is missing'),
    ({'prompt': 'x', 'chosen': '', 'rejected': 'z'}, 'must be a non-empty string'),
    ({'prompt': 'x', 'ranking': ['a']}, 'at least 2 responses'),
    ({'prompt': 'x', 'completion': 'y', 'score': 'high'}, '"score" must be a finite number'),
    ({'prompt': 'x', 'chosen': 'y', 'rejected': 'z', 'margin': float('nan')}, '"margin"'),
    ({'prompt': 'x', 'text': 'y'}, 'expected "chosen" \\+ "rejected"'),
    ({'prompt': [{'role': 'user', 'content': 'x'}], 'chosen': [{'role': 'user', 'content': 'y'}],
      'rejected': 'z'}, 'a response holds only assistant messages'),
])
def test_bad_records_name_the_file_and_line(tok, tmp_path, rec, message):
  path = tmp_path / 'prefs.jsonl'
  path.write_text(json.dumps({'prompt': 'ok', 'chosen': 'a', 'rejected': 'b'}) + '\n' +
                  json.dumps(rec) + '\n')
  from train import paths
  (good, _), (bad, where) = paths.read_jsonl(str(path), 'preference data file')
  pd.record_units(good, tok, PalmaxChat(tok), 'ok')
  with pytest.raises(ValueError, match=f'{path}:2: .*{message}'):
    pd.record_units(bad, tok, PalmaxChat(tok), where)


def test_units_layout_truncation_and_fields(tok):
  chat = PalmaxChat(tok)
  long = ' '.join(['word'] * 200)
  units = (pd.record_units({'prompt': 'p', 'chosen': 'yes', 'rejected': long}, tok, chat, 'a') +
           pd.record_units({'prompt': 'p', 'completion': 'q', 'score': -1.5}, tok, chat, 'b') +
           pd.record_units({'prompt': long, 'chosen': 'a', 'rejected': 'b'}, tok, chat, 'c'))
  streams, stats = pd.lay_out(units, seq_len=32, pad_id=tok.pad_id)
  # The third unit's responses fall past the row: dropped and counted; the long rejected one is
  # cut to seq_len tokens, one slot left free for the reward read at its last input.
  assert stats['units'] == 2 and stats['dropped'] == 1 and stats['truncated'] >= 1
  w2 = 2 * 33
  tokens = streams['tokens'].reshape(-1, w2)
  fields = pd.unit_fields(tokens, {k: v.reshape(-1, w2) for k, v in streams.items()
                                   if k != 'tokens'})
  assert fields['tokens'].shape == (2, 33) and fields['loss_mask'].shape == (2, 32)
  np.testing.assert_array_equal(fields['pair'], [1, 0])
  np.testing.assert_array_equal(fields['score'], [0, -1.5])
  assert fields['rejected_loss_mask'][1].sum() == 0   # A pointwise unit has no rejected row.
  assert fields['rejected_loss_mask'][0, -1] == 0      # The last slot of a full row stays free.
  # The loss mask weighs exactly the response's tokens as targets.
  got = tok.decode([int(t) for t, w in zip(fields['tokens'][0, 1:], fields['loss_mask'][0]) if w])
  assert got == 'yes' + tok.decode([tok.eos_id])


def test_bundled_pairs_are_disjoint_and_rejected_ones_fail_the_tasks_metric():
  splits = {s: preference_tasks.stdlib_preferences(s) for s in ('train', 'validation', 'test')}
  assert len(splits['train']) > 500 and len(splits['validation']) > 50
  files = {s: {p['source'].split(':')[0] for p in v} for s, v in splits.items()}
  assert not files['train'] & files['validation'] and not files['train'] & files['test']
  for p in splits['validation']:
    assert p['chosen'] != p['rejected']
    assert preference_tasks.parses(p['prompt'], p['chosen'])
  broken = [not preference_tasks.parses(p['prompt'], p['rejected']) for p in splits['validation']]
  assert np.mean(broken) > 0.9   # Unparseable, but for the rare body no cut breaks.
