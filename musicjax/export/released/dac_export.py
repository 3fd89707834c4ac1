"""Our codec -> a DAC folder that transformers' `DacModel.from_pretrained`
loads (config.json + model.safetensors): the inverse of dac.py, so a DAC
imported and fine-tuned in musicjax goes back to PyTorch.

Only a codec of DAC's architecture exports (dac.FIXED_MODEL, latent_dim =
encoder_dim * 2 ** len(strides), a power-of-two codebook size); anything
else is a ConfigError naming the key. Weight norm is folded into the plain
weights DacModel holds (g * v / |v|), Snake alphas take DAC's [1, C, 1].
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from musicjax import config as config_lib
from musicjax import fileio
from musicjax.config import ConfigError
from musicjax.export import export as export_lib
from musicjax.export.released import dac
from musicjax.train import runs

# transformers refuses safetensors files whose metadata names no framework.
METADATA = {'format': 'pt'}


def dac_config(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """DacConfig's config.json for our codec config `c`.

  Raises:
    ConfigError: `c` is not DAC's architecture (naming the key).
  """
  flat = config_lib.flatten(c)
  m = c.model
  strides = tuple(int(s) for s in m.strides)
  for key, value in dac.FIXED_MODEL.items():
    # Even strides pad evenly: where the extra sample goes is moot.
    if key == 'model.pad_extra' and all(s % 2 == 0 for s in strides):
      continue
    if flat[key] != value:
      raise ConfigError(f'config.{key} is {flat[key]!r}; DAC has {value!r} '
                        '(only a codec of DAC\'s architecture exports to '
                        'DacModel)')
  latent = int(m.encoder_dim) * 2 ** len(strides)
  if int(m.latent_dim) != latent:
    raise ConfigError(f'config.model.latent_dim is {m.latent_dim}; DAC\'s is '
                      f'encoder_dim * 2 ** len(strides) = {latent}')
  n = int(m.rvq.codebook_size)
  if n & (n - 1):
    raise ConfigError(f'config.model.rvq.codebook_size is {n}; DacModel '
                      'needs a power of two')
  return {
      'model_type': dac.MODEL_TYPE, 'architectures': [dac.ARCHITECTURE],
      'encoder_hidden_size': int(m.encoder_dim),
      'downsampling_ratios': list(strides),
      'decoder_hidden_size': int(m.decoder_dim),
      'n_codebooks': int(m.rvq.num_codebooks), 'codebook_size': n,
      'codebook_dim': int(m.rvq.codebook_dim),
      'quantizer_dropout': float(m.rvq.quantizer_dropout),
      'commitment_loss_weight': float(c.loss.commit_weight),
      'codebook_loss_weight': float(c.loss.codebook_weight),
      'sampling_rate': int(c.data.sample_rate),
      'hidden_size': latent, 'hop_length': math.prod(strides),
      'upsampling_ratios': list(strides[::-1]), 'dtype': 'float32'}


def _weight(v: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
  """g * v / |v|, the norm over all but the last (output) axis: in float32
  as our layers compute it, with the norm rounded from float64 as dac.py
  rounds the g it imports. So an imported, untouched g gives g / |v| = 1
  exactly and the export holds the imported weights bit for bit."""
  axes = tuple(range(v.ndim - 1))
  norm = dac.norm(v, axes, eps).astype(np.float32)
  return v.astype(np.float32) * (g.astype(np.float32) / norm)


def tensors(arrays: dict[str, np.ndarray], c: ml_collections.ConfigDict
            ) -> dict[str, np.ndarray]:
  """DacModel's float32 tensors by name from our codec's arrays by path
  ('encoder/stem/v')."""
  out = {}
  for ours, (theirs, kind) in dac.names(c).items():
    if kind == 'snake':
      out[f'{theirs}.alpha'] = arrays[f'{ours}/alpha'].reshape(1, -1, 1)
      continue
    w = _weight(arrays[f'{ours}/v'], arrays[f'{ours}/g'], dac.CONV_NORM_EPS)
    if kind == 'up':   # polyphase [m, in, stride, out] -> [in, out, m * stride]
      m, cin, s, cout = w.shape
      w = w[::-1].transpose(1, 3, 0, 2).reshape(cin, cout, m * s)
    else:              # [k, in, out] -> [out, in, k]
      w = w.transpose(2, 1, 0)
    out[f'{theirs}.weight'] = w
    out[f'{theirs}.bias'] = arrays[f'{ours}/bias']
  eps = float(c.model.rvq.norm_eps)
  q = arrays
  for k in range(int(c.model.rvq.num_codebooks)):
    p = f'quantizer.quantizers.{k}.'
    out[p + 'codebook.weight'] = q['quantizer/codebook'][k]
    for side in ('in', 'out'):   # dense [in, out] -> 1x1 conv [out, in, 1]
      w = _weight(q[f'quantizer/{side}_v'][k], q[f'quantizer/{side}_g'][k], eps)
      out[f'{p}{side}_proj.weight'] = w.T[:, :, None]
      out[f'{p}{side}_proj.bias'] = q[f'quantizer/{side}_b'][k]
  return {n: np.ascontiguousarray(x, np.float32) for n, x in out.items()}


def export_model(model, c: ml_collections.ConfigDict, out_dir: str
                 ) -> dict[str, Any]:
  """Writes `out_dir`/config.json and model.safetensors for our codec
  `model` under config `c` (only process 0 writes)."""
  meta = dac_config(c)   # fails before gathering anything
  arrays = {k: export_lib.to_host(x)
            for k, x in export_lib.state_paths(model).items()}
  named = tensors(arrays, c)
  if jax.process_index() == 0:
    fileio.write_with(os.path.join(out_dir, dac.SINGLE),
                      lambda tmp: save_file(named, tmp, metadata=METADATA))
    fileio.write_text(os.path.join(out_dir, dac.CONFIG),
                      json.dumps(meta, indent=2, sort_keys=True))
  return {'out': out_dir, 'format': 'dac', 'tensors': len(named),
          'sample_rate': meta['sampling_rate']}


def export_workdir(workdir: str, out_dir: str, step: int | None = None,
                   overrides: list[str] | tuple[str, ...] = ()
                   ) -> dict[str, Any]:
  """Exports the latest (or `step`) checkpoint of codec run `workdir` as a
  DAC folder.

  Raises:
    ConfigError: not a codec run, or not DAC's architecture.
  """
  export_lib.check_out_dir(out_dir)
  config = runs.saved_config(workdir, 'codec', verb='export-dac',
                             overrides=overrides)
  dac_config(config)   # fail before restoring anything
  run = runs.load_run(workdir, step, config=config)
  with run.activate():
    summary = export_model(run.model, config, out_dir)
  return {**summary, 'step': run.step}
