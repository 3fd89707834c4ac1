"""`musicjax export`: a trained model's weights as safetensors for PyTorch.

Writes into DIR:
  * model.safetensors (or shards + model.safetensors.index.json), the
    inference model's state in PyTorch names and layouts (mapping.py);
  * config.json: family, the run's `model` config, the facts a loader needs
    (sample rate, special token ids), the step and dtype;
  * README.md: how to load it (musicjax_torch.from_pretrained).
Sharded and multi-host arrays are gathered first; only process 0 writes.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from musicjax import fileio
from musicjax.accomp import model as accomp_model
from musicjax.errors import UserError
from musicjax.export import files
from musicjax.export import mapping
from musicjax.lm import layout
from musicjax.lm import model as lm_model
from musicjax.nn import lora
from musicjax.train import runs

FORMAT = 'musicjax-export'
FORMAT_VERSION = 1
DTYPES = ('float32', 'bfloat16')
DEFAULT_MAX_SHARD_BYTES = 2 * 10 ** 9
# Task names -> model family (DPO fine-tunes the LM).
FAMILY_OF_TASK = {'codec': 'codec', 'lm': 'lm', 'lm_dpo': 'lm', 'accomp': 'accomp'}


# Codec settings that musicjax_torch builds only at these values (the
# SEANet/EnCodec parts of our codec: musicjax_torch/codec.py has none of
# them, so it would load such weights wrongly or not at all).
TORCH_CODEC_ONLY = {'lstm_layers': (0, "EnCodec's LSTM"),
                    'activation': ('snake', 'ELU activations'),
                    'pad_mode': ('zeros', 'reflect padding'),
                    'compress': (1, 'compressed residual units'),
                    'conv_shortcut': (False, 'conv shortcuts'),
                    'up_weight_norm': ('out', "torch's transposed-conv weight norm")}


def family(config: ml_collections.ConfigDict) -> str:
  """The export family of a run's config; refuses what musicjax_torch lacks."""
  if config.task not in FAMILY_OF_TASK:
    raise UserError(f'task {config.task!r} has no exportable model (families: '
                    f'{mapping.FAMILIES})')
  fam = FAMILY_OF_TASK[config.task]
  if fam == 'codec':
    for key, (value, part) in TORCH_CODEC_ONLY.items():
      got = config.model.get(key, value)
      if got != value:
        raise UserError(
            f'config model.{key} = {got!r} ({part}): musicjax_torch has no such '
            'codec layer, so `musicjax export` cannot write this run; export an '
            'EnCodec run with `musicjax export-encodec --workdir W --out DIR` '
            "(transformers' EncodecModel)")
  return fam


def path_key(path) -> str:
  """'a/b/c' for a pytree key path (the name the mapping tables match)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def state_paths(model: nnx.Module) -> dict[str, Any]:
  """{'a/b/c': array} of every state variable of the inference model."""
  _, state = nnx.split(model)
  return {path_key(path): leaf for path, leaf in
          jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))}


def to_host(x: Any) -> np.ndarray:
  """The whole array on this host (gathered over processes if needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def loader_facts(config: ml_collections.ConfigDict, fam: str,
                 model: nnx.Module) -> dict[str, Any]:
  """What a PyTorch loader needs beyond the model config."""
  if fam == 'codec':
    return {'sample_rate': int(model.sample_rate),
            'audio_channels': int(model.audio_channels),
            'hop_length': int(model.hop_length),
            # Layer constants (not config keys): recorded so a loader can
            # refuse an export whose numerics it would not reproduce.
            'conv_norm_eps': float(model.encoder.stem.norm_eps),
            'snake_eps': float(model.encoder.act.eps)}
  m = config.model
  facts: dict[str, Any] = {}
  if fam == 'lm':
    # The model's layout: the released HeartMuLa's END is config, and its
    # text table has no LM extra tokens.
    facts.update(
        end_id=lm_model.end_id(m),
        special_id=layout.special_id(m.codebook_size),
        extra_ids=({t: layout.extra_id(m.text_vocab_size, t)
                    for t in layout.EXTRA_TOKENS}
                   if m.get('text_extra_tokens', True) else {}),
        melody_null=layout.MELODY_NULL, melody_silent=layout.MELODY_SILENT)
  else:
    facts.update(frame_rate=float(m.frame_rate),
                 mask_id=accomp_model.mask_id(m.codebook_size),
                 pad_id=accomp_model.pad_id(m.codebook_size))
  return facts


def export_model(model: nnx.Module, config: ml_collections.ConfigDict,
                 out_dir: str, *, dtype: str = 'float32', step: int = 0,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, Any]:
  """Writes the export of `model` (see module doc); returns a summary."""
  if dtype not in DTYPES:
    raise UserError(f'--dtype must be one of {DTYPES}, got {dtype!r}')
  check_out_dir(out_dir)
  fam = family(config)
  tensors: dict[str, np.ndarray] = {}
  gathered = 0
  for path, x in state_paths(model).items():
    gathered += isinstance(x, jax.Array) and not x.is_fully_addressable
    arr = to_host(x)
    if jax.numpy.issubdtype(arr.dtype, jax.numpy.floating):
      # Every float array in the requested dtype (bfloat16 is not an
      # np.floating subtype, so numpy's own test would miss it).
      arr = arr.astype(jax.numpy.bfloat16 if dtype == 'bfloat16' else np.float32)
    tensors.update(mapping.export_arrays(fam, path, arr))
  meta = {
      'format': FORMAT, 'format_version': FORMAT_VERSION, 'family': fam,
      'task': config.task, 'step': int(step), 'dtype': dtype,
      'model': config.model.to_dict(), **loader_facts(config, fam, model),
      # The whole run config: `musicjax import-torch` recreates the run.
      'run_config': json.loads(config.to_json()),
      'num_tensors': len(tensors),
      'num_parameters': int(sum(t.size for t in tensors.values())),
  }
  summary = {'out': out_dir, 'family': fam, 'step': int(step), 'dtype': dtype,
             'tensors': len(tensors), 'parameters': meta['num_parameters'],
             'gathered_from_other_processes': int(gathered)}
  if jax.process_index() != 0:
    return summary
  os.makedirs(out_dir, exist_ok=True)
  summary['files'] = files.write(tensors, out_dir, max_shard_bytes)
  fileio.write_text(os.path.join(out_dir, 'config.json'),
                    json.dumps(meta, indent=1, sort_keys=True))
  fileio.write_text(os.path.join(out_dir, 'README.md'), _readme(meta))
  return summary


def check_out_dir(out_dir: str) -> None:
  """--out must be a directory, or a path where one can be made (checked
  before a restore that may take minutes)."""
  if '://' in out_dir:
    raise UserError(f'--out {out_dir}: export writes to a local or mounted '
                    'filesystem; export locally, then copy the directory '
                    '(gsutil cp -r / aws s3 cp --recursive)')
  if jax.process_index() != 0:
    return   # only process 0 writes
  probe = os.path.abspath(out_dir)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise UserError(f'--out {out_dir}: {probe} is a file, not a directory; '
                    'choose a directory for the export')
  if not os.access(probe, os.W_OK):
    raise UserError(f'--out {out_dir}: {probe} is not writable')


def _readme(meta: dict[str, Any]) -> str:
  fam = meta['family']
  use = {
      'codec': 'codes = model.encode(audio)   # audio [B, T, C] float\n'
               'audio = model.decode(codes)',
      'lm': 'logits = model(batch)   # the training forward\n'
            'out = model.generate(prompt, max_frames=250, cfg_scale=1.5, '
            'top_k=50)',
      'accomp': 'logits = model.logits(model.hidden(vocal, accomp, valid, prefix))\n'
                'codes = model.accompany(vocal, steps=60)',
  }[fam]
  return f"""# musicjax export: {fam}

Exported by `musicjax export` from task `{meta['task']}` at step
{meta['step']}, weights in {meta['dtype']} (safetensors only; nothing
pickled). `config.json` holds the model's hyper-parameters.

```python
import musicjax_torch   # pip install 'musicjax[torch]' (needs only torch, numpy)
model = musicjax_torch.from_pretrained('path/to/this/directory')
{use}
```

Back to JAX (after fine-tuning in PyTorch, save with
`musicjax_torch.save_pretrained(model, DIR)`):

```bash
musicjax import-torch --from DIR --workdir RUN
```
"""


def export_workdir(config: ml_collections.ConfigDict, workdir: str, out_dir: str,
                   *, dtype: str = 'float32', step: int | None = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, Any]:
  """Exports the latest (or `step`) checkpoint of a run."""
  check_out_dir(out_dir)
  family(config)  # fail before restoring anything
  if lora.enabled(config):
    # A LoRA run exports as its merged weights (musicjax merge-lora).
    from musicjax.train import merge_adapters
    config, s, state, step = merge_adapters.merged(workdir, step,
                                                   verb='export')
    run = runs.Run(workdir, config, s.task, s.mesh, s.rules,
                   nnx.merge(s.graphdef, state), step)
  else:
    run = runs.load_run(workdir, step, config=config)
  with run.activate():
    return export_model(run.model, config, out_dir, dtype=dtype, step=run.step,
                        max_shard_bytes=max_shard_bytes)
