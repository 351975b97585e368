"""Tests for train/corpus.py: readers, normalization, dedupe, split, fingerprint, error messages."""
import os

import numpy as np
import pytest

from train import corpus
from train.corpus import Document


def _write(path, data):
  mode = 'wb' if isinstance(data, bytes) else 'w'
  with open(path, mode) as f:
    f.write(data)
  return str(path)


# -- normalize / dedupe / split -----------------------------------------------------------------


def test_normalize_keeps_code_whitespace():
  text = 'def f():\r\n\treturn 1\r\n\r\n    x = "e\u0301"\rend  \n\n \t'
  assert corpus.normalize(text) == 'def f():\n\treturn 1\n\n    x = "\u00e9"\nend'
  assert corpus.normalize('  leading kept') == '  leading kept'
  assert corpus.normalize(' \n\t ') == ''


def test_dedupe_keeps_first_and_order():
  docs = [Document('a', 'x'), Document('b', 'y'), Document('c', 'x'), Document('d', 'z')]
  assert [d.name for d in corpus.dedupe(docs)] == ['a', 'b', 'd']


def test_split_is_deterministic_and_stable_when_docs_are_added():
  docs = [Document(str(i), f'document number {i}') for i in range(200)]
  train, val = corpus.split(docs, 0.1, seed=3)
  assert (train, val) == corpus.split(docs, 0.1, seed=3)
  assert 5 <= len(val) <= 40 and len(train) + len(val) == 200
  more = docs + [Document(str(i), f'another document {i}') for i in range(100)]
  _, val_more = corpus.split(more, 0.1, seed=3)
  assert {d.name for d in val} <= {d.name for d in val_more}  # nobody moved out of val
  assert corpus.split(docs, 0.1, seed=4)[1] != val  # the seed matters


def test_split_gives_at_least_one_val_doc_and_validates():
  docs = [Document('a', 'alpha'), Document('b', 'beta')]
  train, val = corpus.split(docs, 1e-9, seed=0)
  assert len(val) == 1 and len(train) == 1
  assert corpus.split(docs, 0.0, seed=0) == (docs, [])
  with pytest.raises(ValueError, match='val_fraction'):
    corpus.split(docs, 1.5, seed=0)
  with pytest.raises(ValueError, match='val_fraction.*no training documents'):
    corpus.split(docs[:1], 0.5, seed=0)


# -- text / jsonl readers -----------------------------------------------------------------------


def test_text_documents_files_and_globs(tmp_path):
  for name in ('b.txt', 'a.txt', 'c.md'):
    _write(tmp_path / name, f'text of {name}')
  docs = corpus.text_documents([str(tmp_path / '*.txt'), str(tmp_path / 'c.md')])
  assert [os.path.basename(d.name) for d in docs] == ['a.txt', 'b.txt', 'c.md']
  assert docs[0].text == 'text of a.txt'


@pytest.mark.parametrize('make, pattern', [
    (lambda p: str(p / 'missing.txt'), r'missing\.txt.*does not exist'),
    (lambda p: str(p / 'nothing*.txt'), r'nothing\*\.txt.*matches no files'),
    (lambda p: _write(p / 'empty.txt', b''), r'empty\.txt: file is empty'),
    (lambda p: _write(p / 'latin1.txt', b'caf\xe9 ok'),
     r'latin1\.txt: not valid UTF-8 at byte offset 3'),
    (lambda p: str(p), r'is a directory'),
])
def test_text_documents_errors_name_the_path(tmp_path, make, pattern):
  with pytest.raises(ValueError, match=pattern):
    corpus.text_documents([make(tmp_path)])


def test_text_documents_requires_paths():
  with pytest.raises(ValueError, match='data.paths is empty'):
    corpus.text_documents([])


def test_jsonl_documents(tmp_path):
  path = _write(tmp_path / 'd.jsonl', '{"text": "one", "id": 1}\n\n{"text": "two\\nlines"}\n')
  docs = corpus.jsonl_documents([path])
  assert [d.text for d in docs] == ['one', 'two\nlines']
  assert docs[1].name == f'{path}:3'
  other = _write(tmp_path / 'e.jsonl', '{"body": "x"}\n')
  assert corpus.jsonl_documents([other], text_key='body')[0].text == 'x'


@pytest.mark.parametrize('content, pattern', [
    ('{"text": "ok"}\n{"text": oops}\n', r'bad\.jsonl:2: not valid JSON'),
    ('{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: missing key 'text'"),
    ('["text"]\n', r"bad\.jsonl:1: missing key 'text'"),
    ('{"text": 3}\n', r"bad\.jsonl:1: field 'text' must be a string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, pattern):
  path = _write(tmp_path / 'bad.jsonl', content)
  with pytest.raises(ValueError, match=pattern):
    corpus.jsonl_documents([path])


# -- load_documents -----------------------------------------------------------------------------


def _text_corpus(tmp_path, n=30):
  for i in range(n):
    _write(tmp_path / f'doc{i:02d}.txt', f'document {i}\r\n    body {i % 7}\n\n')
  _write(tmp_path / 'dup.txt', 'document 0\n    body 0')  # duplicate of doc00 after normalization
  _write(tmp_path / 'blank.txt', ' \n \n')  # empty after normalization
  return {'source': 'text', 'paths': [str(tmp_path / '*.txt')], 'val_fraction': 0.2, 'seed': 0,
          'max_docs': 0}


def test_load_documents_pipeline_and_fingerprint(tmp_path):
  cfg = _text_corpus(tmp_path)
  train, val, info = corpus.load_documents(cfg)
  assert info['read_docs'] == 32 and info['dropped_empty'] == 1 and info['dropped_duplicates'] == 1
  assert info['train_docs'] + info['val_docs'] == 30 and info['val_docs'] >= 1
  assert info['val_bytes'] == sum(len(d.text.encode()) for d in val)
  assert all('\r' not in d.text and not d.text.endswith('\n') for d in train + val)
  assert len(info['fingerprint']) == 64
  assert corpus.load_documents(cfg)[2]['fingerprint'] == info['fingerprint']

  limited = corpus.load_documents(dict(cfg, max_docs=10))
  assert limited[2]['train_docs'] + limited[2]['val_docs'] == 10
  assert limited[2]['fingerprint'] != info['fingerprint']
  assert corpus.load_documents(dict(cfg, seed=1))[2]['fingerprint'] != info['fingerprint']


def test_load_documents_errors(tmp_path):
  valid = r"\['stdlib', 'text', 'jsonl', 'tfds'\]"
  with pytest.raises(ValueError, match=r"data.source must be one of " + valid):
    corpus.load_documents({'source': 'web'})
  blank = _write(tmp_path / 'blank.txt', '  \n')
  with pytest.raises(ValueError, match=r'blank\.txt.*empty after normalization'):
    corpus.load_documents({'source': 'text', 'paths': [blank]})
  with pytest.raises(ValueError, match='max_docs'):
    corpus.load_documents({'source': 'text', 'paths': [blank], 'max_docs': -1})
  with pytest.raises(ValueError, match='tfds_name'):
    corpus.load_documents({'source': 'tfds', 'tfds_name': ''})


# -- TFDS (a tiny array_record dataset built in tmp_path; nothing is downloaded) -----------------


def _tiny_tfds_builder():
  import tensorflow_datasets as tfds

  class PalmaxTestText(tfds.core.GeneratorBasedBuilder):
    """Five short text records in a train split, two in test."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'text': tfds.features.Text(), 'label': tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(5), 'test': self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'text': f'record {i}\n    indented \u00e9', 'label': i}

  return PalmaxTestText


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  _tiny_tfds_builder()(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def test_tfds_documents(tfds_dir):
  docs = corpus.tfds_documents('palmax_test_text', 'train', 'text', tfds_dir)
  assert sorted(d.text for d in docs) == [f'record {i}\n    indented \u00e9' for i in range(5)]
  assert len(corpus.tfds_documents('palmax_test_text', 'test', 'text', tfds_dir, limit=1)) == 1
  cfg = {'source': 'tfds', 'tfds_name': 'palmax_test_text', 'tfds_split': 'train',
         'tfds_data_dir': tfds_dir, 'text_key': 'text', 'val_fraction': 0.2}
  train, val, info = corpus.load_documents(cfg)
  assert len(train) + len(val) == 5 and info['tfds_name'] == 'palmax_test_text'


def test_tfds_errors(tfds_dir, tmp_path):
  with pytest.raises(ValueError, match=r"palmax_test_text.*record 0: missing key 'body'"):
    corpus.tfds_documents('palmax_test_text', 'train', 'body', tfds_dir)
  with pytest.raises(ValueError, match=r"palmax_test_text.*split 'valid'.*Unknown split"):
    corpus.tfds_documents('palmax_test_text', 'valid', 'text', tfds_dir)
  with pytest.raises(ValueError, match=r'palmax_test_text.*not prepared'):
    corpus.tfds_documents('palmax_test_text', 'train', 'text', str(tmp_path / 'none'))
  with pytest.raises(ValueError, match=r"no_such_dataset_xyz.*not found"):
    corpus.tfds_documents('no_such_dataset_xyz', 'train', 'text', str(tmp_path))


# -- the bundled stdlib corpus (the only test that reads all of it) ------------------------------


def test_stdlib_corpus_is_deterministic():
  docs = corpus.stdlib_documents()
  names = [d.name for d in docs]
  py = [n for n in names if n.endswith('.py')]
  topics = [n for n in names if n.startswith('pydoc_data.topics:')]
  assert py == sorted(py) and len(py) > 1000 and len(topics) > 50
  assert 'os.py' in py and any(n.startswith('test/') for n in py)
  assert not any(n.startswith(('site-packages/', '_sysconfigdata_')) for n in py)
  cfg = {'source': 'stdlib', 'val_fraction': 0.01, 'seed': 0}
  train, val, info = corpus.load_documents(cfg)
  assert info['fingerprint'] == corpus.fingerprint(train, val)
  assert info['python_version'] and info['val_docs'] >= 1 and info['train_bytes'] > 10_000_000
  assert corpus.fingerprint(*corpus.split(corpus.dedupe(
      [Document(d.name, corpus.normalize(d.text)) for d in docs if corpus.normalize(d.text)]),
      0.01, 0)) == info['fingerprint']
