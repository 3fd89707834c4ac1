"""A whole song's accompaniment from a trained accomp run (`musicjax accompany`).

vocal.wav -> codec tokens -> sampler (one compiled loop per window) -> codec
decoding -> the accompaniment stem, and the mix = the ORIGINAL vocal samples
(at their own rate and channels, never re-encoded, resampled or scaled) + the
stem resampled to the vocal's rate. The mix is written as 32-bit float WAV so
that a loud sum does not clip (the stem too, so mix - stem = vocal exactly);
a warning says when the mix exceeds full scale.

Long songs: with `sample.window_frames` = 0 the whole song is one pass (the
attention runs in query blocks of `model.backbone.attention_chunk`, so memory
grows linearly with length). Otherwise the song is cut into windows of that
many frames; window n + 1 starts `sample.overlap_frames` before window n ends,
and its overlapping frames start committed to window n's tokens, so the seam
is continued rather than restarted. The last window is padded (invalid
frames), so every window has one shape and compiles once.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf

from musicjax import fileio
from musicjax.accomp import data
from musicjax.accomp import sample as sample_lib
from musicjax.codec import chunked
from musicjax.data import audio
from musicjax.data import song_text
from musicjax.errors import UserError
from musicjax.lm import song as lm_song
from musicjax.lm import token_data
from musicjax.train import runs


@dataclasses.dataclass
class AccompRequest:
  vocal_path: str
  tags: str = ''
  reference_path: str = ''
  steps: int | None = None         # None: config.sample.*
  seed: int = 0
  cfg_scale: float | None = None
  temperature: float | None = None


def _say(msg: str) -> None:
  print(f'[accompany] {msg}', file=sys.stderr, flush=True)


class AccompContext(lm_song.TokenSetAccess):
  """A restored accomp run with its tokenizer and its token set
  (`musicjax.lm.song.TokenSet`: facts, codec, tags seen, audio loading)."""

  def __init__(self, config, workdir: str, codec_workdir: str | None = None,
               step: int | None = None):
    self.run = runs.serving(runs.load_run(
        workdir, step, config=config, expect='accomp', verb='accompany'))
    config = self.config = self.run.config   # None given: the run's own
    self.mesh, self.rules = self.run.mesh, self.run.rules
    self.model = self.run.model
    self.tokens = lm_song.TokenSet(config.data.path, data.check_dataset(config),
                                   codec_workdir)
    self.info, self.codec_workdir = self.tokens.info, self.tokens.codec_workdir
    self.tokenizer = token_data.load_tokenizer(config)
    self._fns = {}

  def text_ids(self, tags: str) -> np.ndarray:
    """[L] token ids (-1 padded) of a user's tags ('genre: chorale; mood:
    calm' or 'chorale, calm'); warns about tags never seen in training."""
    if not tags.strip():
      _say('no tags given: unconditional for text')
      return self.tag_ids({})
    parsed = song_text.derive_tags({'tags': tags})
    unknown = sorted({v for vs in parsed.values() for v in vs} - self.known_tags())
    if unknown:
      _say(f'WARNING: tags never seen in training: {", ".join(unknown)} (the '
           'model may ignore them)')
    return self.tag_ids(parsed)

  def tag_ids(self, tags: dict) -> np.ndarray:
    """[L] token ids of parsed tags, exactly as the data pipeline makes them."""
    n = self.config.data.max_text_tokens
    out = np.full((n,), -1, np.int32)
    text = song_text.format_tags(tags)
    ids = self.tokenizer.encode(text)[:n] if text else []
    out[:len(ids)] = ids
    return out

  def reference_codes(self, path: str) -> np.ndarray | None:
    """[R, K] codes of the middle of a reference recording, or None (the LM's
    reference handling: the same segment length, padding and warnings)."""
    return lm_song.reference_codes(self, path)

  def sampler(self, frames: int, cfg: bool, s: sample_lib.Sampling,
              callback: Callable[[Any], None] | None = None,
              trace: bool = False):
    """jit(accompany) for windows of `frames` (cached per shape and setting);
    with `trace`, it returns (codes, tokens after every step)."""
    key = (frames, cfg, s, callback is not None, trace)
    if key not in self._fns:
      model = self.model
      ar = self.config.model.decode == 'ar'

      def run(vocal, valid, text, ref, ref_valid, known, rng):
        b = vocal.shape[0]
        yes = jnp.ones((b,), bool)
        batch = {'text': text, 'ref': ref, 'ref_valid': ref_valid}
        prefix = sample_lib.prefix_of(model, batch, yes, yes)
        null = sample_lib.prefix_of(model, batch, ~yes, ~yes) if cfg else None
        if ar:
          return sample_lib.accompany_ar(model, vocal, valid, prefix, rng, s, null)
        return sample_lib.accompany(model, vocal, valid, prefix, rng, s, null,
                                    known=known, callback=callback, trace=trace)

      self._fns[key] = jax.jit(run)
    return self._fns[key]


def sampling_for(config, req: AccompRequest) -> sample_lib.Sampling:
  s = sample_lib.sampling_from_config(config.sample)
  s = dataclasses.replace(
      s, steps=s.steps if req.steps is None else int(req.steps),
      cfg_scale=s.cfg_scale if req.cfg_scale is None else float(req.cfg_scale),
      temperature=(s.temperature if req.temperature is None
                   else float(req.temperature)))
  try:
    s.validate()
  except ValueError as e:
    raise UserError(f'accompany: {e} (--steps / --temperature)') from None
  return s


def windows(frames: int, window: int, overlap: int) -> list[int]:
  """Start frames of the windows covering [0, frames)."""
  if window <= 0 or frames <= window:
    return [0]
  if not 0 <= overlap < window:
    raise UserError(f'config.sample.overlap_frames={overlap} must be in '
                    f'[0, window_frames={window})')
  return list(range(0, frames - overlap, window - overlap))


class _Progress:
  """Prints steps done, speed and ETA from inside the compiled loop."""

  def __init__(self, total_steps: int, every: int):
    self.total, self.every = total_steps, max(every, 1)
    self.done = 0
    self.t0 = time.perf_counter()

  def __call__(self, i):
    self.done += 1
    if self.done % self.every and self.done != self.total:
      return
    dt = time.perf_counter() - self.t0
    eta = dt / self.done * (self.total - self.done)
    _say(f'step {self.done}/{self.total}, {dt:.0f}s elapsed, ETA {eta:.0f}s')


def accompany_codes(ctx: AccompContext, vocal_codes: np.ndarray, text: np.ndarray,
                    ref: np.ndarray | None, s: sample_lib.Sampling, seed: int,
                    progress: bool = True) -> np.ndarray:
  """Accompaniment codes [F, K] for vocal codes [F, K] (module docstring)."""
  c = ctx.config
  k = c.model.num_codebooks
  vocal_codes = np.asarray(vocal_codes)[:, :k].astype(np.int32)
  f = len(vocal_codes)
  if f < 1:
    raise UserError('the vocal has no codec frames (empty audio?)')
  window = int(c.sample.window_frames) or f
  window = min(window, f)
  starts = windows(f, window, int(c.sample.overlap_frames))
  cfg = s.cfg_scale != 1.0
  cb = None
  if progress and c.model.decode == 'diffusion':
    cb = _Progress(s.steps * len(starts), max(s.steps // 6, 1))
  fn = ctx.sampler(window, cfg, s, cb)
  r = max(c.data.reference_frames, 1)
  ref_valid = ref is not None
  ref = ref if ref is not None else np.full((r, k), -1, np.int32)
  out = np.full((f, k), -1, np.int32)
  rng = jax.random.key(seed)
  with ctx.run.activate():
    for n, a in enumerate(starts):
      b = min(a + window, f)
      voc = np.full((window, k), -1, np.int32)
      voc[:b - a] = vocal_codes[a:b]
      valid = np.arange(window) < b - a
      known = np.full((window, k), -1, np.int32)
      known[:b - a] = out[a:b]        # the overlap with the previous window
      res = fn(jnp.asarray(voc[None]), jnp.asarray(valid[None]),
               jnp.asarray(text[None]), jnp.asarray(ref[None]),
               jnp.asarray([ref_valid]), jnp.asarray(known[None]),
               jax.random.fold_in(rng, n))
      out[a:b] = np.asarray(res)[0, :b - a]
  if (out < 0).any() or (out >= c.model.codebook_size).any():
    raise RuntimeError('the sampler left frames without a valid code')
  return out


def unmasking_trace(ctx: AccompContext, vocal_codes: np.ndarray,
                    text: np.ndarray, s: sample_lib.Sampling, seed: int
                    ) -> np.ndarray:
  """The diffusion sampler's tokens after every step [steps, F, K] for vocal
  codes [F, K] of one window (no reference, no guidance), MASK where still
  masked: how the accompaniment emerges."""
  c = ctx.config
  if c.model.decode != 'diffusion':
    raise UserError("unmasking_trace needs model.decode='diffusion'")
  k = c.model.num_codebooks
  voc = np.asarray(vocal_codes)[:, :k].astype(np.int32)
  window = int(c.sample.window_frames) or len(voc)
  if not 1 <= len(voc) <= window:
    raise UserError(f'unmasking_trace takes 1..{window} frames (one sampler '
                    f'window), got {len(voc)}')
  r = max(c.data.reference_frames, 1)
  fn = ctx.sampler(len(voc), False, s, trace=True)
  with ctx.run.activate():
    _, states = fn(jnp.asarray(voc[None]), jnp.ones((1, len(voc)), bool),
                   jnp.asarray(text[None]), jnp.full((1, r, k), -1, jnp.int32),
                   jnp.zeros((1,), bool), jnp.full((1, len(voc), k), -1, jnp.int32),
                   jax.random.key(seed))
  return np.asarray(states)[:, 0]


def _native_vocal(path: str) -> tuple[np.ndarray, int]:
  """The vocal file's samples [T, C] float32 at its own rate, unchanged."""
  if not os.path.isfile(path):
    raise UserError(f'--vocal {path}: file not found')
  try:
    x, sr = sf.read(path, dtype='float32', always_2d=True)
  except (RuntimeError, sf.LibsndfileError) as e:
    raise UserError(f'--vocal {path}: cannot read it as audio ({e}); '
                    'convert it to wav or flac') from None
  if not len(x) or not np.all(np.isfinite(x)):
    raise UserError(f'--vocal {path}: empty or non-finite samples')
  return x, int(sr)


def mix_with_vocal(vocal: np.ndarray, vocal_sr: int, stem: np.ndarray,
                   stem_sr: int) -> np.ndarray:
  """vocal [T, C] + the stem resampled to vocal_sr, cut/padded to T, on every
  channel. The vocal's samples enter the sum unchanged."""
  mono = np.asarray(stem, np.float32).reshape(len(stem), -1).mean(axis=1)
  up = audio.resample(mono[:, None], stem_sr, vocal_sr)[:, 0]
  up = np.pad(up[:len(vocal)], (0, max(len(vocal) - len(up), 0)))
  return vocal + up[:, None].astype(np.float32)


def accompany_file(ctx: AccompContext, req: AccompRequest, out_path: str,
                   stem_path: str) -> dict[str, Any]:
  """Writes the mix (OUT), the stem, STEM.npz (codes) and STEM.png."""
  t0 = time.perf_counter()
  vocal, vocal_sr = _native_vocal(req.vocal_path)
  codec = ctx.codec()
  sr = int(ctx.info['sample_rate'])
  vocal_codes = chunked.encode_array(codec, ctx.load_wave(req.vocal_path))
  s = sampling_for(ctx.config, req)
  _say(f'{len(vocal) / vocal_sr:.1f} s of vocal = {len(vocal_codes)} frames; '
       f'{s.steps} steps, guidance {s.cfg_scale:g}, seed {req.seed}')
  t1 = time.perf_counter()
  codes = accompany_codes(ctx, vocal_codes, ctx.text_ids(req.tags),
                          ctx.reference_codes(req.reference_path), s, req.seed)
  t_sample = time.perf_counter() - t1
  stem = chunked.decode_array(codec, codes)
  mix = mix_with_vocal(vocal, vocal_sr, stem, sr)
  peak = float(np.max(np.abs(mix)))
  if peak > 1.0:
    _say(f'WARNING: the mix peaks at {peak:.2f} (> full scale); it is written '
         'as float WAV, so nothing is clipped, but lower it before export')
  # Each file whole or not at all (a rerun never finds half a wav).
  fileio.write_with(out_path, lambda tmp: sf.write(
      tmp, mix, vocal_sr, subtype='FLOAT', format='WAV'))
  fileio.write_with(stem_path, lambda tmp: sf.write(
      tmp, stem, sr, subtype='FLOAT', format='WAV'))
  base = os.path.splitext(stem_path)[0]
  fileio.write_npz(base + '.npz', codes=codes.astype(np.int32),
                   vocal_codes=np.asarray(vocal_codes, np.int32),
                   frame_rate=ctx.frame_rate, sample_rate=sr)
  fileio.write_with(base + '.png', lambda tmp: lm_song.spectrogram_png(
      stem[:, 0] if len(stem) else np.zeros(16), sr, tmp,
      f'accompaniment | seed {req.seed}'), suffix='.png')
  return {'mix': out_path, 'stem': stem_path, 'frames': int(len(codes)),
          'seconds': len(codes) / ctx.frame_rate,
          'sample_seconds': round(t_sample, 2),
          'total_seconds': round(time.perf_counter() - t0, 2),
          'tokens': base + '.npz', 'spectrogram': base + '.png'}
