"""Convert checkpoints between Hugging Face and palmax, streaming tensor by tensor.

  python -m launch.convert --from=hf --family=llama --src=HF_DIR --dst=WORKDIR
  python -m launch.convert --to=hf --family=llama --src=WORKDIR --dst=HF_DIR [--max_shard_size=5GB]
  python -m launch.convert --to=peft --family=llama --src=LORA_WORKDIR --dst=ADAPTER_DIR

Families: llama, mistral, mixtral, gemma, gemma2, gemma3. Import reads safetensors or PyTorch
.bin (sharded index files included) and writes a workdir that `launch.sample` and
`--config=configs/finetune.py:WORKDIR` use unchanged: config.json, a step-0 orbax checkpoint
(parameters in --param_dtype, zero optimizer state), the checkpoint's own tokenizer
(`hf_tokenizer/`) and its HF config and per-tensor dtypes (`hf/`). Export writes sharded
safetensors, their index, config.json and the tokenizer files: a directory
`transformers.AutoModelForCausalLM.from_pretrained` loads. A round trip is bit-identical.
A PEFT workdir (config.peft) exports merged: adapters folded into the (dequantized) base. `--to=peft`
writes a LoRA workdir's adapters unmerged as adapter_config.json + adapter_model.safetensors,
which `peft.PeftModel.from_pretrained` loads on the base exported with --to=hf.

Output goes to a temporary directory next to --dst, renamed into place at the end: on any error
(unknown family, missing tensor, shape or dtype the target cannot hold) --dst is left untouched.
"""
from __future__ import annotations

import os
import shutil

from absl import flags, logging


def _define_flags() -> None:
  """CLI flags, defined only when this module is the program, so tests and other modules
  can import its functions without absl duplicate-flag clashes."""
  global _FROM, _TO, _FAMILY, _SRC, _DST, _PARAM_DTYPE, _DTYPE, _MAX_SHARD, _STEP
  _FROM = flags.DEFINE_enum('from', None, ['hf'], 'Import: --src is a HF checkpoint directory.')
  _TO = flags.DEFINE_enum('to', None, ['hf', 'peft'], 'Export: --src is a palmax workdir; hf '
                          'writes a HF checkpoint (PEFT adapters merged in), peft a LoRA '
                          "workdir's adapters in the PEFT library's format.")
  _FAMILY = flags.DEFINE_string('family', None, 'llama | mistral | mixtral | gemma | gemma2 | gemma3')
  _SRC = flags.DEFINE_string('src', None, 'Source directory.')
  _DST = flags.DEFINE_string('dst', None, 'Destination directory (must not exist, or be empty).')
  _PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16'],
                                   'Import: parameter dtype of the palmax checkpoint.')
  _DTYPE = flags.DEFINE_enum('dtype', 'auto', ['auto', 'float32', 'bfloat16', 'float16'],
                             "Export: tensor dtype; 'auto' = each tensor's dtype at import (float32 "
                             'for palmax-trained models), exactly. An explicit dtype rounds.')
  _MAX_SHARD = flags.DEFINE_string('max_shard_size', '5GB', 'Export: largest safetensors shard.')
  _STEP = flags.DEFINE_integer('step', None, 'Export: checkpoint step (default: latest).')




def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Keep orbax/absl INFO chatter off the console.
  run(_FROM.value, _TO.value, _FAMILY.value, _SRC.value, _DST.value, param_dtype=_PARAM_DTYPE.value,
      dtype=_DTYPE.value, max_shard_size=_MAX_SHARD.value, step=_STEP.value,
      log=lambda s: print(s, flush=True))


def run(from_: str | None, to: str | None, family: str | None, src: str | None, dst: str | None,
        *, param_dtype: str = 'float32', dtype: str = 'auto', max_shard_size: str = '5GB',
        step: int | None = None, log=print) -> None:
  """The command, callable from Python. Raises ValueError/FileNotFoundError on bad input."""
  from model.hf import FAMILIES
  if (from_ is None) == (to is None):
    raise ValueError('pass exactly one of --from=hf (import) or --to=hf|peft (export)')
  if family not in FAMILIES:
    raise ValueError(f'--family={family!r} is not supported; expected one of {sorted(FAMILIES)}')
  for name, value in (('--src', src), ('--dst', dst)):
    if not value:
      raise ValueError(f'{name} is required')
  src, dst = os.path.abspath(src), os.path.abspath(dst)
  if not os.path.isdir(src):
    raise FileNotFoundError(f'--src {src} is not a directory')
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise ValueError(f'--dst {dst} already exists and is not empty; choose a new directory')
  tmp = f'{dst}.tmp-convert-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    if from_:
      from launch import convert_import
      convert_import.import_hf(src, tmp, family, param_dtype=param_dtype, final_dst=dst, log=log)
    elif to == 'peft':
      from launch import convert_export
      convert_export.export_peft_adapter(src, tmp, family, step=step, log=log)
    else:
      from launch import convert_export
      convert_export.export_hf(src, tmp, family, dtype=dtype, max_shard_size=max_shard_size,
                               step=step, log=log)
    if os.path.isdir(dst):
      os.rmdir(dst)   # Empty (checked above).
    os.replace(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  log(f'Wrote {dst}')


if __name__ == '__main__':
  from launch import errors
  _define_flags()
  errors.run(main)
