"""A checkpoint's own tokenizer behind palmax's Tokenizer interface, and the loaders that pick it."""
import io
import json
import os

import pytest
import sentencepiece as spm

from train import hf_tokenizer, tokenizer as tokenizer_lib

TEXT = '\n'.join(f'def f{i}(x):\n    return x * {i}  # ünïcode' for i in range(200))


def _spm(path, **ids):
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.split('\n')), model_writer=buf,
                                 vocab_size=400, model_type='bpe', byte_fallback=True,
                                 hard_vocab_limit=False, minloglevel=2, **ids)
  with open(path, 'wb') as f:
    f.write(buf.getvalue())
  return str(path)


LLAMA_IDS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


def test_llama_layout_sentencepiece_is_used_as_is(tmp_path):
  path = _spm(tmp_path / 'tokenizer.model', **LLAMA_IDS)
  # palmax's own Tokenizer wants pad=0; the loader falls back to the checkpoint wrapper.
  with pytest.raises(ValueError, match='pad id'):
    tokenizer_lib.Tokenizer.load(path)
  tok = tokenizer_lib.load_tokenizer(path)
  assert isinstance(tok, hf_tokenizer.HFTokenizer) and tok.kind == 'sentencepiece'
  assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 0)
  assert tok.doc_start_id == tok.bos_id   # HF checkpoints open documents on BOS.
  sp = spm.SentencePieceProcessor(model_file=path)
  text = 'def f7(x):\n        return x  # ünïcode ✓'
  assert tok.encode(text) == sp.encode(text)            # Exactly what the model was trained on.
  assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
  assert tok.encode_batch([text, 'x']) == [sp.encode(text), sp.encode('x')]
  with pytest.raises(ValueError, match='out of range'):
    tok.decode([tok.vocab_size])


def test_special_tokens_come_from_tokenizer_config(tmp_path):
  d = tmp_path / 'hf'
  d.mkdir()
  _spm(d / 'tokenizer.model', **LLAMA_IDS)
  # Llama 2 style: token strings (or dicts with 'content') naming pieces of the model.
  (d / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': {'content': '<s>'}, 'eos_token': '</s>', 'pad_token': '<unk>'}))
  tok = hf_tokenizer.HFTokenizer(str(d))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  # Saved into a workdir it reloads identically, with its resolved ids pinned.
  tok.save(str(tmp_path / 'saved'))
  again = hf_tokenizer.HFTokenizer(str(tmp_path / 'saved'))
  assert again.digest == tok.digest and again.ids == tok.ids
  assert os.path.isfile(tmp_path / 'saved' / hf_tokenizer.IDS_FILE)
  with pytest.raises(ValueError, match='no tokenizer.model or tokenizer.json'):
    hf_tokenizer.HFTokenizer(str(tmp_path))


def test_data_tokenizer_path_to_a_checkpoint_dir_is_cached_in_the_workdir(tmp_path):
  d = tmp_path / 'hf'
  d.mkdir()
  _spm(d / 'tokenizer.model', **LLAMA_IDS)
  wd = tmp_path / 'wd'
  wd.mkdir()
  data_cfg = {'tokenizer': {'vocab_size': 512, 'path': str(d)}}
  tok = tokenizer_lib.get_tokenizer(data_cfg, [], str(wd))
  meta = json.load(open(wd / 'tokenizer.json'))
  assert meta['kind'] == 'hf' and meta['model_sha256'] == tok.digest
  loaded = tokenizer_lib.load_workdir_tokenizer(str(wd))
  assert isinstance(loaded, hf_tokenizer.HFTokenizer) and loaded.digest == tok.digest
  # A palmax workdir (no 'kind') still loads its own tokenizer.model.
  pal = tmp_path / 'pal'
  pal.mkdir()
  tokenizer_lib.train_tokenizer([TEXT], 400, path=str(pal / 'tokenizer.model'))
  assert isinstance(tokenizer_lib.load_workdir_tokenizer(str(pal)), tokenizer_lib.Tokenizer)
  with pytest.raises(ValueError, match='more than data.tokenizer.vocab_size=300'):
    tokenizer_lib.get_tokenizer({'tokenizer': {'vocab_size': 300, 'path': str(d)}}, [], None)
