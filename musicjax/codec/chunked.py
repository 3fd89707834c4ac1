"""Encode and decode whole files of any length, in fixed-size chunks.

Each chunk is a window of `chunk + 2 * context` frames placed inside the file
(clamped at the ends, never padded with fake data), and only its middle
`chunk` frames are kept. With `context` at least the model's receptive field,
the result equals processing the whole file at once, while every call has the
same shape, so it compiles once and memory stays flat however long the file.
"""
from __future__ import annotations

import functools
import math
import os
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf
from flax import nnx
from tqdm import tqdm

from musicjax import __version__
from musicjax import config as config_lib
from musicjax.data import audio as audio_io
from musicjax.errors import UserError
from musicjax.train import runs

CODES_FORMAT = 'musicjax-codes-v1'
# The arrays decoding reads; encode_file also writes channels, frame_rate,
# n_q, source and musicjax_version.
_CODES_ARRAYS = ('format', 'codes', 'sample_rate', 'num_samples', 'hop_length',
                 'codebook_size')
# Written only by a codec with model.normalize: the input scale per frame.
_SCALE = 'scale'
_CODES_EXPECTED = (
    'A musicjax codes file is the .npz that `musicjax encode --workdir '
    "CODEC_RUN song.wav song.npz` writes: 'codes' (int16 or int32, shape "
    f"[frames, codebooks]), 'format' (the string {CODES_FORMAT!r}) and the "
    "numbers 'sample_rate', 'num_samples', 'hop_length' and 'codebook_size'; "
    'make one with that command')


def _windows(total: int, chunk: int, context: int) -> list[tuple[int, int, int]]:
  """(window_start, keep_from, keep_to) in units; window length chunk + 2*context."""
  length = chunk + 2 * context
  plan = []
  for start in range(0, total, chunk):
    stop = min(start + chunk, total)
    w0 = min(max(start - context, 0), total - length)
    plan.append((w0, start - w0, stop - w0))
  return plan


def _run_chunked(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, unit: int,
                 chunk: int, context: int, out_per_unit: int, batch: int,
                 desc: str, progress: bool = True) -> np.ndarray:
  """Applies `fn` ([n, L*unit, ...] -> [n, L*out_per_unit, ...]) over windows of x."""
  total = x.shape[0] // unit
  length = chunk + 2 * context
  if total <= length:  # short input: one exact call
    return np.asarray(fn(x[None]))[0]
  plan = _windows(total, chunk, context)
  outs = []
  for g in tqdm(range(0, len(plan), batch), desc=desc, unit='batch',
                disable=not progress or len(plan) <= batch):
    group = plan[g:g + batch]
    wins = [x[w0 * unit:(w0 + length) * unit] for w0, _, _ in group]
    wins += [wins[-1]] * (batch - len(wins))  # fixed shape: one compile
    y = np.asarray(fn(np.stack(wins)))
    for (_, a, b), yi in zip(group, y):
      outs.append(yi[a * out_per_unit:b * out_per_unit])
  return np.concatenate(outs, axis=0)


# Module-level jits with the graph static: every call on a codec of the same
# structure and window shape reuses one compiled program (a closure per call
# recompiled each time: about half a second per call even for the tiny codec).
# The weights are an argument, so a model trained further is never stale.
@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode(graphdef, state, audio, n_q):
  return nnx.merge(graphdef, state).encode(audio, n_q=n_q)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, codes):
  return nnx.merge(graphdef, state).decode(codes)


def _chunk_and_context(model, chunk_seconds: float, context_seconds: float):
  return (max(1, round(chunk_seconds * model.frame_rate)),
          math.ceil(context_seconds * model.frame_rate))


def encode_array(model, audio: np.ndarray, *, n_q: int | None = None,
                 chunk_seconds: float = 10.0, context_seconds: float = 1.0,
                 batch: int = 1, progress: bool = True) -> np.ndarray:
  """audio [T, C] at the codec's rate -> codes [F, K']; F = ceil(T / hop)."""
  hop = model.hop_length
  frames = math.ceil(audio.shape[0] / hop)
  audio = np.pad(audio, ((0, frames * hop - audio.shape[0]), (0, 0)))
  graphdef, state = nnx.split(model)
  enc = lambda a: _encode(graphdef, state, jnp.asarray(a), n_q)
  chunk, context = _chunk_and_context(model, chunk_seconds, context_seconds)
  return _run_chunked(enc, audio.astype(np.float32), hop, chunk, context, 1,
                      batch, 'encode', progress)


def frame_scales(model, audio: np.ndarray, *, chunk_seconds: float = 10.0,
                 context_seconds: float = 1.0) -> np.ndarray | None:
  """float32 [F]: the `input_scale` each frame was encoded with by
  `encode_array` (one per window: its RMS over the model's normalize level),
  or None for a codec without `model.normalize`."""
  if not model.normalize:
    return None
  hop = model.hop_length
  frames = math.ceil(audio.shape[0] / hop)
  audio = np.pad(audio, ((0, frames * hop - audio.shape[0]), (0, 0)))
  chunk, context = _chunk_and_context(model, chunk_seconds, context_seconds)
  length = chunk + 2 * context
  if frames <= length:  # _run_chunked's short input: one window, all of it
    length, plan = frames, [(0, 0, frames)]
  else:
    plan = _windows(frames, chunk, context)
  out = np.empty(frames, np.float32)
  for w0, a, b in plan:
    window = audio[w0 * hop:(w0 + length) * hop]
    rms = float(np.sqrt(np.mean(np.square(window, dtype=np.float64))))
    out[w0 + a:w0 + b] = rms / model.normalize_rms + model.normalize_eps
  return out


def decode_array(model, codes: np.ndarray, *, scales: np.ndarray | None = None,
                 chunk_seconds: float = 10.0, context_seconds: float = 1.0,
                 batch: int = 1, progress: bool = True) -> np.ndarray:
  """codes [F, K'] -> audio [F * hop, C], times the per-frame `scales` [F]
  (`frame_scales`) when given."""
  graphdef, state = nnx.split(model)
  dec = lambda c: _decode(graphdef, state, jnp.asarray(c))
  chunk, context = _chunk_and_context(model, chunk_seconds, context_seconds)
  audio = _run_chunked(dec, codes.astype(np.int32), 1, chunk, context,
                       model.hop_length, batch, 'decode', progress)
  if scales is None:
    return audio
  if np.shape(scales) != (codes.shape[0],):
    raise ValueError(f'scales must be [frames] = [{codes.shape[0]}], got '
                     f'{np.shape(scales)}')
  return audio * np.repeat(np.asarray(scales, np.float32), model.hop_length)[:, None]


def encode_file(config, workdir: str, in_path: str, out_path: str, *,
                n_q: int | None = None, chunk_seconds: float = 10.0,
                context_seconds: float = 1.0) -> dict:
  """Any audio file (any rate/channels) -> .npz with codes and metadata."""
  config_lib.require_task(config, workdir, ('codec',), 'encode')
  if not os.path.isfile(in_path):
    raise UserError(f'input audio not found: {in_path}')
  model = runs.load_run(workdir, config=config).model
  k = model.num_codebooks
  if n_q is not None and not 1 <= n_q <= k:
    raise UserError(f'--n-q must be between 1 and {k} (the codec has {k} codebooks), got {n_q}')
  sr = int(config.data.sample_rate)
  try:
    audio = audio_io.load_audio(in_path, sr, int(config.data.channels))
  except audio_io.BadAudio as e:
    raise UserError(str(e)) from None
  codes = encode_array(model, audio, n_q=n_q, chunk_seconds=chunk_seconds,
                       context_seconds=context_seconds)
  scales = frame_scales(model, audio, chunk_seconds=chunk_seconds,
                        context_seconds=context_seconds)
  dtype = np.int16 if model.codebook_size <= np.iinfo(np.int16).max else np.int32
  meta = dict(format=CODES_FORMAT, sample_rate=sr, channels=audio.shape[1],
              num_samples=audio.shape[0], hop_length=model.hop_length,
              frame_rate=float(model.frame_rate), n_q=codes.shape[1],
              codebook_size=model.codebook_size, source=os.path.basename(in_path),
              musicjax_version=__version__)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  extra = {} if scales is None else {'scale': scales}  # codec.normalize
  np.savez_compressed(out_path, codes=codes.astype(dtype), **extra, **meta)
  return meta


def _not_codes(path: str, why: str) -> UserError:
  return UserError(f'{path} is not a musicjax codes file: {why}. {_CODES_EXPECTED}')


def _unreadable(path: str, name: str | None, e: Exception) -> UserError:
  """The error for an archive numpy cannot read, never suggesting unpickling."""
  text = str(e)
  # numpy's own message tells the user to pass allow_pickle=True: loading a
  # pickle from a file of unknown origin runs its code, so never repeat it.
  if 'pickle' in text.lower():
    if name is None:  # a zip that np.load did not take for an .npz
      return _not_codes(path, 'it is a zip archive, but not an .npz')
    return _not_codes(path, f'its {name!r} array holds Python objects (dtype '
                      'object), which musicjax never loads from a file '
                      '(loading them could run code from it)')
  what = 'it' if name is None else f'its {name!r} array'
  return _not_codes(path, f'{what} could not be read ({type(e).__name__}: '
                    f'{text}): the file is corrupt or truncated')


def load_codes(path: str) -> dict[str, np.ndarray]:
  """The arrays of a codes file written by `encode_file`, checked.

  Never unpickles anything: the file may come from anywhere.

  Args:
    path: the .npz file.

  Returns:
    {name: array} for 'format', 'codes', 'sample_rate', 'num_samples',
    'hop_length' and 'codebook_size', plus 'scale' [frames] when the codec
    normalises its input (`model.normalize`).

  Raises:
    UserError: no such file, or it is not a codes file (the message says what
      the file holds and what a codes file holds).
  """
  if not os.path.isfile(path):
    raise UserError(f'codes file not found: {path}; make one with `musicjax '
                    f'encode --workdir CODEC_RUN song.wav {path}`')
  # np.load tries to unpickle whatever is neither .npz nor .npy (and its error
  # then suggests allow_pickle): only hand it zip archives.
  if not zipfile.is_zipfile(path):
    raise _not_codes(path, 'it is not an .npz (zip) archive, or the archive is '
                     'truncated')
  name = None
  try:
    with np.load(path, allow_pickle=False) as z:
      names = list(z.files)
      missing = [k for k in _CODES_ARRAYS if k not in names]
      if missing:
        raise _not_codes(path, f'it holds the arrays {names} but not {missing}')
      data = {}
      for name in _CODES_ARRAYS + ((_SCALE,) if _SCALE in names else ()):
        data[name] = z[name]
  except UserError:
    raise
  except Exception as e:  # zip/npy errors come in many types
    raise _unreadable(path, name, e) from None
  for name, value in data.items():
    if not isinstance(value, np.ndarray):  # a zip member that is not an .npy
      raise _not_codes(path, f'its {name!r} member is not a NumPy array')
  fmt = data['format']
  if fmt.shape != () or fmt.dtype.kind != 'U' or str(fmt) != CODES_FORMAT:
    raise _not_codes(path, f"its 'format' is {fmt.dtype} {fmt.shape} "
                     f'{fmt.tolist()!r}, not {CODES_FORMAT!r}')
  codes = data['codes']
  if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
    raise _not_codes(path, f"its 'codes' array has dtype {codes.dtype} and shape "
                     f'{codes.shape}, not int16/int32 [frames, codebooks]')
  for name in _CODES_ARRAYS[2:]:
    v = data[name]
    if v.shape != () or v.dtype.kind not in 'iuf':
      raise _not_codes(path, f'its {name!r} is {v.dtype} {v.shape}, not a number')
  scale = data.get(_SCALE)
  if scale is not None and (scale.shape != (codes.shape[0],) or
                            scale.dtype.kind != 'f' or
                            not np.all(np.isfinite(scale) & (scale > 0))):
    raise _not_codes(path, f"its {_SCALE!r} array ({scale.dtype} {scale.shape}) "
                     f'is not one positive finite float per frame ({codes.shape[0]})')
  return data


def decode_file(config, workdir: str, in_path: str, out_path: str, *,
                chunk_seconds: float = 10.0, context_seconds: float = 1.0) -> dict:
  """.npz from encode_file -> audio file at the codec's sample rate."""
  config_lib.require_task(config, workdir, ('codec',), 'decode')
  data = load_codes(in_path)  # before restoring: a bad file fails fast
  model = runs.load_run(workdir, config=config).model
  codes = data['codes']
  if codes.ndim != 2 or codes.shape[1] > model.num_codebooks:
    raise UserError(f'{in_path}: codes have shape {codes.shape}, this codec takes '
                    f'[frames, <= {model.num_codebooks}]')
  if int(data['hop_length']) != model.hop_length or int(
      data['codebook_size']) != model.codebook_size:
    raise UserError(f'{in_path} was encoded by a different codec (hop '
                    f'{int(data["hop_length"])}, codebook size '
                    f'{int(data["codebook_size"])}) than the one in {workdir}')
  if codes.min() < 0 or codes.max() >= model.codebook_size:
    raise UserError(f'{in_path}: codes outside [0, {model.codebook_size})')
  audio = decode_array(model, codes, scales=data.get('scale'),
                       chunk_seconds=chunk_seconds,
                       context_seconds=context_seconds)
  audio = audio[:int(data['num_samples'])]
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  sf.write(out_path, np.clip(audio, -1.0, 1.0), int(data['sample_rate']))
  return {'num_samples': int(audio.shape[0]), 'sample_rate': int(data['sample_rate'])}
