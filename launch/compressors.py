"""Bits per byte of classic compressors on the validation bytes: a baseline for the LM's bits/byte.

    python -m launch.compressors --workdir=DIR [--source=stdlib --val_fraction=0.01 --seed=0]
    python -m launch.compressors --source=text --paths='data/*.txt,more/*.txt'

Compresses exactly `train.data.validation_text(val_docs)` (each val doc + one newline standing for
its EOS), the byte string behind the trainer's `eval_bits_per_byte`. Prints one line per
compressor and writes `DIR/compressors.json`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import time

from absl import app, flags

from train import corpus
from train import data as data_lib
from train import paths


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
  """8 * compressed size / raw size for gzip -9, bz2 -9 and xz -9e."""
  if not data:
    raise ValueError('nothing to compress: the validation text is empty (data.val_fraction = 0?)')
  sizes = {
      'gzip-9': len(gzip.compress(data, compresslevel=9, mtime=0)),
      'bz2-9': len(bz2.compress(data, compresslevel=9)),
      'xz-9e': len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
  }
  return {name: 8.0 * size / len(data) for name, size in sizes.items()}


def run(data_cfg, workdir: str | None = None) -> dict:
  """Loads the corpus split like the trainer does and measures the compressors on the val bytes."""
  start = time.time()
  _, val_docs, info = corpus.load_documents(data_cfg)
  raw = data_lib.validation_text(val_docs).encode('utf-8')
  result = {'fingerprint': info['fingerprint'], 'source': info['source'],
            'val_docs': len(val_docs), 'val_bytes_with_separators': len(raw),
            'bits_per_byte': compressor_bits_per_byte(raw),
            'seconds': round(time.time() - start, 2)}
  if workdir:
    paths.makedirs(workdir)
    paths.write_json(paths.join(workdir, 'compressors.json'), result)
  return result


def _define_flags() -> None:
  """CLI flags, defined only when this module is the program, so tests and other modules
  can import its functions without absl duplicate-flag clashes. Defaults: configs/base.py."""
  from configs import base
  defaults = base.get_base().data
  global _FLAGS
  _FLAGS = {
      'workdir': flags.DEFINE_string('workdir', None, 'Where to write compressors.json.'),
      'source': flags.DEFINE_enum('source', defaults.source, corpus.SOURCES, 'Corpus source.'),
      'paths': flags.DEFINE_list('paths', list(defaults.paths), 'Files/globs for text or jsonl.'),
      'text_key': flags.DEFINE_string('text_key', defaults.text_key, 'jsonl/tfds text field.'),
      'tfds_name': flags.DEFINE_string('tfds_name', defaults.tfds_name, 'TFDS dataset name.'),
      'tfds_split': flags.DEFINE_string('tfds_split', defaults.tfds_split, 'TFDS split.'),
      'tfds_data_dir': flags.DEFINE_string('tfds_data_dir', defaults.tfds_data_dir or None,
                                           'TFDS data dir.'),
      'val_fraction': flags.DEFINE_float('val_fraction', defaults.val_fraction,
                                         'Fraction of documents in the val split.'),
      'max_docs': flags.DEFINE_integer('max_docs', defaults.max_docs, '0 = every document.'),
      'seed': flags.DEFINE_integer('seed', defaults.seed, 'Split seed.'),
  }


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  data_cfg = {k: f.value for k, f in _FLAGS.items() if k != 'workdir'}
  result = run(data_cfg, _FLAGS['workdir'].value)
  print(f'corpus {result["fingerprint"][:12]} ({result["source"]}): {result["val_docs"]} val docs, '
        f'{result["val_bytes_with_separators"]} bytes')
  for name, bpb in result['bits_per_byte'].items():
    print(f'{name:8s} {bpb:.4f} bits/byte')


if __name__ == '__main__':
  from launch import errors
  _define_flags()
  errors.run(main)   # ValueError -> exit 2; OSError (--workdir, a full disk), Ctrl-C: errors.py.
