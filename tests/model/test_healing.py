"""Tests for model/inference/healing.py on a small palmax tokenizer trained on generated code."""
import numpy as np
import pytest

from model.inference.healing import Healed, TokenHealer
from train import tokenizer as tokenizer_lib


def code_texts(n_docs: int = 8) -> list[str]:
  """A few hundred lines of Python-like code (as tests/conftest.py's write_code_corpus)."""
  out = []
  for i in range(n_docs):
    body = '\n'.join(
        f'def func_{i}_{j}(x, y={j}):\n    """Return x plus {j}."""\n    if x > {i}:\n'
        f'        return x + y\n    for k in range(y):\n        x = x * {j % 7}\n    return x\n'
        for j in range(6))
    out.append(f'# module {i}\nimport os\n\n{body}\n')
  return out


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.train_tokenizer(code_texts(), 400)


@pytest.fixture(scope='module')
def healer(tok):
  return TokenHealer(tok)


def test_prompt_ending_in_newline_is_healed(tok, healer):
  prompt = 'def fibonacci(n):\n'
  ids = tok.encode(prompt)
  healed = healer.heal(ids)
  assert healed.ids == ids[:-1]
  assert healed.removed_text == tok.decode([ids[-1]]) and healed.removed_text.endswith('\n')
  assert tok.decode(healed.ids) + healed.removed_text == prompt
  allowed = healed.allowed_V
  assert allowed.shape == (tok.vocab_size,) and allowed.dtype == bool and allowed[ids[-1]]
  texts = [tok.decode([i]) for i in range(tok.vocab_size)]
  assert all(texts[i].startswith(healed.removed_text) for i in np.flatnonzero(allowed))
  # Every longer piece starting with the removed text is allowed ('\n    ' always exists: the
  # palmax scheme makes each newline + indent run a vocabulary symbol); byte pieces are not.
  longer = [i for i, t in enumerate(texts) if t.startswith(healed.removed_text)
            and len(t) > len(healed.removed_text) and not tok.id_to_piece(i).startswith('<0x')]
  assert tok.encode('\n    ')[0] in longer
  assert set(longer) <= set(np.flatnonzero(allowed))
  newline_byte = tok._sp.piece_to_id('<0x0A>')
  assert texts[newline_byte] == '\n' and not allowed[newline_byte]
  assert healed.strip('\n    return n') == '    return n'
  with pytest.raises(ValueError, match='does not start with the healed text'):
    healed.strip('return n')


@pytest.mark.parametrize('prompt', ['def f(x):\n', 'def f(x):\n    ', 'x = 1 ', 'if x:\n\t',
                                    '# module 3\nimport os\n\n', 'def func_1_2(x, y=2):\n    '])
def test_healed_prompts_decode_back_exactly(tok, healer, prompt):
  ids = tok.encode(prompt)
  healed = healer.heal(ids)
  assert len(healed.ids) == len(ids) - 1 and healed.removed_text
  assert tok.decode(healed.ids) + healed.removed_text == tok.decode(ids) == prompt
  assert healed.allowed_V[ids[-1]]


@pytest.mark.parametrize('prompt', ['def f(x):\n    return x', 'import os', '\n', 'x', ''])
def test_prompts_not_ending_mid_token_are_untouched(tok, healer, prompt):
  ids = tok.encode(prompt)
  assert len(ids) <= 1 or not prompt[-1].isspace()
  assert healer.heal(ids) == Healed(ids, None, '')


def test_specials_and_byte_pieces_are_never_extensions(tok, healer):
  ids = tok.encode('x = 1 ')
  healed = healer.heal(ids)
  assert healed.removed_text == ' ' and healed.allowed_V.sum() > 5
  assert tok.decode([tok.unk_id]).startswith(' ') and not healed.allowed_V[tok.unk_id]
  space_byte = tok._sp.piece_to_id('<0x20>')
  assert tok.decode([space_byte]) == ' ' and not healed.allowed_V[space_byte]
  assert not healed.allowed_V[[tok.pad_id, tok.eos_id, tok.bos_id]].any()


def test_padded_vocab_and_bad_size(tok):
  healer = TokenHealer(tok, vocab_size=tok.vocab_size + 24)
  healed = healer.heal(tok.encode('def f(x):\n'))
  assert healed.allowed_V.shape == (tok.vocab_size + 24,) and not healed.allowed_V[-24:].any()
  assert healer.heal(tok.encode('y = 2\n')).allowed_V is healed.allowed_V   # Cached per id.
  with pytest.raises(ValueError, match='vocab_size=10 must be >='):
    TokenHealer(tok, vocab_size=10)
