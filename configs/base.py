"""Defaults shared by every training config. Experiment files import `get_base()` and override.

Sections: model (model/config.py ModelConfig fields), data (train/data.py), train (loop,
optimizer, checkpoints), mesh (device mesh sizes and logical-axis rules), pipeline (stages and
schedule), sample (launch/sample.py), serve (launch/serve.py: the engine's slots, pages, chunks),
peft (model/peft/: LoRA, QLoRA, adapters, soft prompts), align (train/align_config.py: reward
model and DPO). train/config_schema.py says what each value may be.
"""
import dataclasses

import ml_collections

from model import sharding
from model.config import ModelConfig, MoEConfig
from model.inference.serve_config import ServeConfig
from model.peft.methods import PeftConfig
from train.align_config import AlignConfig


def moe_section(**overrides) -> ml_collections.ConfigDict:
  """A `cfg.model.moe` section: every MoEConfig field at its default except `overrides`, so each
  is overridable from the command line (--config.model.moe.top_k=1)."""
  return ml_collections.ConfigDict(dataclasses.asdict(MoEConfig.from_dict(overrides)))


def get_base() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()

  # Every ModelConfig field at its dataclass default (one source of truth). Dense: no `moe` key;
  # MoE configs add `cfg.model.moe = moe_section(...)`.
  cfg.model = ml_collections.ConfigDict(
      {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k != 'moe'})

  cfg.data = ml_collections.ConfigDict(dict(
      source='stdlib',        # stdlib | text | jsonl | tfds | sft | preference
      paths=(),               # files or globs for text/jsonl: --config.data.paths='("a/*.txt",)'
      text_key='text',
      tfds_name='', tfds_split='train', tfds_data_dir='',
      val_fraction=0.01, max_docs=0, seq_len=256, seed=0,
      # False: each packed document attends only to itself, positions restarting at 0 (SFT
      # examples); True: windows of the concatenated stream, as in pretraining.
      attend_across_documents=True,
      # source='sft': a bundled task (train/sft_tasks.py, e.g. 'stdlib_functions') or JSONL
      # records in `paths` (+ `sft_val_paths` for validation); examples packed into rows
      # (`sft_packing`), one longer than a row 'truncate'd or 'drop'ped (`sft_overflow`).
      sft_task='', sft_val_paths=(), sft_packing=True, sft_overflow='truncate',
      # With data.tfds_name: records from that prepared TFDS dataset's tfds_split and this one.
      sft_tfds_val_split='validation',
      # source='preference' (train/preference_data.py): pairs, rankings or scores from a
      # bundled task (train/preference_tasks.py) or JSONL `paths` (+ `pref_val_paths`).
      pref_task='', pref_val_paths=()))
  cfg.data.tokenizer = ml_collections.ConfigDict(dict(
      model_type='bpe', path='', train_bytes=8_000_000))
  # One source of truth: the tokenizer is trained to the model's vocabulary size.
  cfg.data.tokenizer.vocab_size = cfg.model.get_ref('vocab_size')

  cfg.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=16, grad_accum=1,
      # adamw, or muon: Muon (Jordan et al. 2024) on the hidden matrices at muon_lr, AdamW at
      # lr on embeddings, output projection and norms.
      optimizer='adamw', muon_lr=0.02,
      lr=3e-3, warmup_steps=100, lr_end_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1, clip_norm=1.0, z_loss=1e-4,
      # 0: the output projection writes float32 [B, T, V] logits (fastest on XLA:CPU); N > 0:
      # a fused projection + cross-entropy over chunks of about N tokens that never holds them
      # (train/loss.py; memory for long sequences and large vocabularies).
      loss_chunk_tokens=0,
      log_every=10, eval_every=200, eval_batches=16,
      # Task specs run at every evaluation (train/evaluation/, e.g. 'arithmetic,stdlib_mc:3shot'):
      # results to WORKDIR/eval/, means to metrics.jsonl; '' = none. eval_tasks_limit: at most
      # this many examples per task (0 = all).
      eval_tasks='', eval_tasks_limit=0,
      checkpoint_every=200, keep_checkpoints=3, async_checkpoints=True,
      nan_policy='stop',      # stop | skip
      seed=0, peak_flops=0.0,  # 0 = measure the matmul peak at start (for MFU)
      tensorboard=True,
      # A workdir (e.g. from `launch.convert --from=hf`) whose latest checkpoint's parameters
      # start a fresh run (new optimizer, step 0); '' = random init. Ignored when resuming.
      init_from='',
      # Resuming: check checkpoint file digests before restoring; when the newest checkpoint
      # fails, 'previous' falls back to the newest one that verifies, 'stop' refuses.
      verify_checkpoints=True, on_corrupt='previous',
      # Steps of the learning-rate schedule; 0 = train.steps when the run starts (a resumed run
      # keeps the schedule it started with).
      schedule_steps=0,
      # What is optimised (train/objectives/: 'lm' = next-token prediction) and which
      # parameters train (a regular expression over paths like 'stack0/block0/attn/w_q'; '' = all).
      objective='lm', trainable=''))

  # In-slice (ICI) size per mesh axis, one may be -1 (fill); cross-slice (DCN) sizes in mesh.dcn
  # (each mesh axis is ICI x DCN). A preset (sharding.PRESETS: data, fsdp, fsdp_tensor,
  # tensor_sequence, expert) replaces the rules and fills its own axis; '' = these sizes and rules.
  cfg.mesh = ml_collections.ConfigDict(dict(
      data=-1, pipeline=1, fsdp=1, expert=1, sequence=1, tensor=1, preset=''))
  cfg.mesh.dcn = ml_collections.ConfigDict({a: 1 for a in sharding.MESH_AXES})
  cfg.mesh.rules = sharding.DEFAULT_RULES

  # Pipeline parallelism (model/pipeline.py): stages 0 = the mesh's pipeline axis size,
  # microbatches 0 = stages; schedule gpipe | circular (circular_repeats chunks per stage).
  cfg.pipeline = ml_collections.ConfigDict(dict(
      stages=0, microbatches=0, schedule='gpipe', circular_repeats=2))

  cfg.sample = ml_collections.ConfigDict(dict(
      prompt='def fibonacci(n):\n', max_new_tokens=128, num_samples=3, temperature=0.8, top_k=0, top_p=0.95,
      seed=0))

  # Serving (launch.serve, model/inference/engine.py): defaults from ServeConfig.
  cfg.serve = ml_collections.ConfigDict(dataclasses.asdict(ServeConfig()))

  # Parameter-efficient fine-tuning (model/peft/): method '' (full fine-tuning) | lora |
  # adapter | prompt, the base frozen and, with `quant` (int8 | int4 | nf4; QLoRA), stored
  # quantized (groups of quant_group_size), or with base_dtype='bfloat16' in 16 bits. lora_*:
  # rank, alpha (scale alpha/rank, alpha/sqrt(rank) with rslora), input dropout, and the
  # weights adapted (re.fullmatch over 'attn/w_q', 'mlp/w_up', ...); adapter_dim/targets:
  # Houlsby bottlenecks after those weights; prompt_tokens: soft-prompt length. Checkpoints then
  # hold only what trains, plus the digest of train.init_from's base.
  cfg.peft = ml_collections.ConfigDict(dataclasses.asdict(PeftConfig()))
  # Alignment objectives (reward, dpo): beta, the DPO variant, label smoothing, SimPO's margin,
  # reward centring; train/align_config.py says what each means.
  cfg.align = ml_collections.ConfigDict(dataclasses.asdict(AlignConfig()))
  return cfg
