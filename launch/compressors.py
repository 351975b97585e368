"""Bits per byte of classic compressors on the validation bytes: a baseline for the LM's bits/byte.

    python -m launch.compressors --workdir=DIR [--source=stdlib --val_fraction=0.01 --seed=0]

Compresses exactly `train.data.validation_text(val_docs)` (each val doc + one newline standing for
its EOS), the byte string behind the trainer's `eval_bits_per_byte`. Prints one line per
compressor and writes `DIR/compressors.json`.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import lzma
import sys
import time

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


def main(argv=None) -> int:
  defaults = data_lib.default_data_config()
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default=None, help='where to write compressors.json')
  parser.add_argument('--source', default=defaults.source, choices=corpus.SOURCES)
  parser.add_argument('--paths', nargs='*', default=[], help='files/globs for text or jsonl')
  parser.add_argument('--text_key', default=defaults.text_key)
  parser.add_argument('--tfds_name', default='')
  parser.add_argument('--tfds_split', default='train')
  parser.add_argument('--tfds_data_dir', default=None)
  parser.add_argument('--val_fraction', type=float, default=defaults.val_fraction)
  parser.add_argument('--max_docs', type=int, default=0)
  parser.add_argument('--seed', type=int, default=defaults.seed)
  args = parser.parse_args(argv)
  data_cfg = {k: v for k, v in vars(args).items() if k != 'workdir'}
  from launch import errors
  try:
    result = run(data_cfg, args.workdir)
  except ValueError as e:   # In-process callers get the exit code too (2: the user's to fix).
    print(f'error: {errors.describe(e)}', file=sys.stderr)
    return errors.USER_ERROR
  print(f'corpus {result["fingerprint"][:12]} ({result["source"]}): {result["val_docs"]} val docs, '
        f'{result["val_bytes_with_separators"]} bytes')
  for name, bpb in result['bits_per_byte'].items():
    print(f'{name:8s} {bpb:.4f} bits/byte')
  return 0


if __name__ == '__main__':
  from launch import errors
  with errors.boundary():   # OSError (--workdir, a full disk), Ctrl-C, bugs: see launch/errors.py.
    sys.exit(main())
