"""Our codec -> an EnCodec folder that transformers'
`EncodecModel.from_pretrained` loads (config.json + model.safetensors): the
inverse of encodec.py, so an EnCodec imported and fine-tuned in musicjax
goes back to PyTorch.

Only a codec of EnCodec's architecture exports (encodec.FIXED_MODEL,
decoder_dim = encoder_dim * 2 ** len(strides), dilations that are powers
of one growth rate, an LSTM, a power-of-two codebook size); anything else is
a ConfigError naming the key. Weight norm stays split as torch's
parametrizations (g, v), so an imported, untouched run exports the very
tensors it was read from.
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
from musicjax.export import import_codec
from musicjax.export.released import encodec
from musicjax.train import runs

# transformers refuses safetensors files whose metadata names no framework.
METADATA = {'format': 'pt'}


def _growth(dilations: tuple[int, ...]) -> int:
  """EncodecConfig.dilation_growth_rate whose powers are `dilations`."""
  growth = dilations[1] if len(dilations) > 1 else 2
  if tuple(growth ** j for j in range(len(dilations))) != dilations:
    raise ConfigError(f'config.model.dilations is {dilations}; EnCodec\'s are '
                      'powers of one growth rate (1, g, g^2, ...)')
  return growth


def bandwidths(c: ml_collections.ConfigDict,
               released: list[float] | None = None) -> list[float]:
  """target_bandwidths (kbps) for which EncodecConfig.num_quantizers is our
  num_codebooks: the imported folder's (`released`) when they still give
  it, else the one bandwidth of all codebooks."""
  m = c.model
  d = {'sampling_rate': int(c.data.sample_rate),
       'upsampling_ratios': list(m.strides)[::-1],
       'codebook_size': int(m.rvq.codebook_size)}
  k = int(m.rvq.num_codebooks)
  if released and encodec.num_quantizers({**d, 'target_bandwidths': released}) == k:
    return list(released)
  bits = math.ceil(math.log2(d['codebook_size']))
  bw = k * encodec.frame_rate(d) * bits / 1000
  while encodec.num_quantizers({**d, 'target_bandwidths': [bw]}) < k:
    bw = math.nextafter(bw, math.inf)   # 1000 * bw rounded below k * rate * bits
  return [bw]


def encodec_config(c: ml_collections.ConfigDict,
                   released: list[float] | None = None) -> dict[str, Any]:
  """EncodecConfig's config.json for our codec config `c`.

  Raises:
    ConfigError: `c` is not EnCodec's architecture (naming the key).
  """
  flat = config_lib.flatten(c)
  m = c.model
  for key, value in encodec.FIXED_MODEL.items():
    if flat[key] != value:
      raise ConfigError(f'config.{key} is {flat[key]!r}; EnCodec has {value!r} '
                        "(only a codec of EnCodec's architecture exports to "
                        'EncodecModel)')
  strides = tuple(int(s) for s in m.strides)
  want = int(m.encoder_dim) * 2 ** len(strides)
  if int(m.decoder_dim) != want:
    raise ConfigError(f'config.model.decoder_dim is {m.decoder_dim}; EnCodec\'s '
                      f'is encoder_dim * 2 ** len(strides) = {want}')
  if int(m.lstm_layers) < 1:
    raise ConfigError('config.model.lstm_layers is 0; EnCodec always has its '
                      'LSTM')
  if int(m.latent_kernel) != int(m.stem_kernel):
    raise ConfigError(f'config.model.latent_kernel is {m.latent_kernel}, '
                      f'stem_kernel {m.stem_kernel}; EnCodec\'s decoder ends '
                      'in a conv of latent_kernel, ours of stem_kernel: they '
                      'must be equal')
  n = int(m.rvq.codebook_size)
  if n & (n - 1):
    raise ConfigError(f'config.model.rvq.codebook_size is {n}; EncodecModel '
                      'needs a power of two')
  pad_mode = {v: k for k, v in encodec.PAD_MODES.items()}[m.pad_mode]
  return {
      'model_type': encodec.MODEL_TYPE, 'architectures': [encodec.ARCHITECTURE],
      'target_bandwidths': bandwidths(c, released),
      'sampling_rate': int(c.data.sample_rate),
      'audio_channels': int(c.data.channels), 'normalize': False,
      'chunk_length_s': None, 'overlap': None,
      'hidden_size': int(m.latent_dim), 'num_filters': int(m.encoder_dim),
      'num_residual_layers': len(m.dilations),
      'upsampling_ratios': list(strides[::-1]),
      'norm_type': 'weight_norm', 'kernel_size': int(m.stem_kernel),
      'last_kernel_size': int(m.latent_kernel),
      'residual_kernel_size': int(m.residual_kernel),
      'dilation_growth_rate': _growth(tuple(int(d) for d in m.dilations)),
      'use_causal_conv': m.padding == 'causal', 'pad_mode': pad_mode,
      'compress': int(m.compress), 'num_lstm_layers': int(m.lstm_layers),
      'trim_right_ratio': 1.0, 'codebook_size': n,
      'codebook_dim': int(m.latent_dim),
      'use_conv_shortcut': bool(m.conv_shortcut), 'dtype': 'float32'}


def tensors(arrays: dict[str, np.ndarray], c: ml_collections.ConfigDict
            ) -> dict[str, np.ndarray]:
  """EncodecModel's float32 tensors by name from our codec's arrays by path
  ('encoder/stem/v')."""
  out = {}
  for ours, (theirs, kind) in encodec.names(c).items():
    if kind == 'lstm':
      for leaf, (name, _) in encodec.LSTM_NAMES.items():
        for i, w in enumerate(arrays[f'{ours}/{leaf}']):
          out[f'{theirs}.{name}{i}'] = w.T if w.ndim == 2 else w
      continue
    v = arrays[f'{ours}/v']
    if kind == 'up':   # polyphase [m, in, stride, out] -> [in, out, m * stride]
      m, cin, s, cout = v.shape
      v = v[::-1].transpose(1, 3, 0, 2).reshape(cin, cout, m * s)
    else:              # [k, in, out] -> [out, in, k]
      v = v.transpose(2, 1, 0)
    out[f'{theirs}.{encodec.V}'] = v
    out[f'{theirs}.{encodec.G}'] = arrays[f'{ours}/g'].reshape(-1, 1, 1)
    out[f'{theirs}.bias'] = arrays[f'{ours}/bias']
  inited = np.asarray([float(arrays['quantizer/initialized'])])
  for k in range(int(c.model.rvq.num_codebooks)):
    p = encodec.codebook_prefix(k)
    for ours, theirs in encodec.CODEBOOK_NAMES.items():
      out[p + theirs] = arrays[f'quantizer/{ours}'][k]
    out[p + 'inited'] = inited
  return {n: np.ascontiguousarray(x, np.float32) for n, x in out.items()}


def export_model(model, c: ml_collections.ConfigDict, out_dir: str,
                 released: list[float] | None = None) -> dict[str, Any]:
  """Writes `out_dir`/config.json and model.safetensors for our codec
  `model` under config `c` (only process 0 writes); `released`: the
  imported folder's target_bandwidths."""
  meta = encodec_config(c, released)   # fails before gathering anything
  arrays = {k: export_lib.to_host(x)
            for k, x in export_lib.state_paths(model).items()}
  named = tensors(arrays, c)
  if jax.process_index() == 0:
    fileio.write_with(os.path.join(out_dir, encodec.SINGLE),
                      lambda tmp: save_file(named, tmp, metadata=METADATA))
    fileio.write_text(os.path.join(out_dir, encodec.CONFIG),
                      json.dumps(meta, indent=2, sort_keys=True))
  return {'out': out_dir, 'format': 'encodec', 'tensors': len(named),
          'sample_rate': meta['sampling_rate'],
          'target_bandwidths': meta['target_bandwidths']}


def released_bandwidths(workdir: str) -> list[float] | None:
  """The target_bandwidths import-encodec recorded in the run, if any."""
  path = os.path.join(workdir, import_codec.RELEASED,
                      import_codec.record_name('encodec'))
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f).get('target_bandwidths')


def export_workdir(workdir: str, out_dir: str, step: int | None = None,
                   overrides: list[str] | tuple[str, ...] = ()
                   ) -> dict[str, Any]:
  """Exports the latest (or `step`) checkpoint of codec run `workdir` as an
  EnCodec folder.

  Raises:
    ConfigError: not a codec run, or not EnCodec's architecture.
  """
  export_lib.check_out_dir(out_dir)
  config = runs.saved_config(workdir, 'codec', verb='export-encodec',
                             overrides=overrides)
  released = released_bandwidths(workdir)
  encodec_config(config, released)   # fail before restoring anything
  run = runs.load_run(workdir, step, config=config)
  with run.activate():
    summary = export_model(run.model, config, out_dir, released)
  return {**summary, 'step': run.step}
