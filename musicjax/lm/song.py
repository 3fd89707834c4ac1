"""Songs from a trained LM: conditions in, audio + tokens + spectrogram out.

The library side of `musicjax generate` (a notebook can call `generate_song`
directly). Host work happens once per call: parse tags and lyrics, turn a
melody recording into chroma classes and a reference recording into codec
tokens, build left-padded prompts (plus null-condition rows for CFG), then
one compiled `generate` call, then codec decoding.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf

from musicjax import fileio
from musicjax.codec import chunked
from musicjax.data import audio
from musicjax.data import melody as melody_lib
from musicjax.data import song_text
from musicjax.data import token_records
from musicjax.errors import UserError
from musicjax.eval import plots
from musicjax.lm import generate as gen
from musicjax.lm import layout
from musicjax.lm import sequence
from musicjax.lm import token_data
from musicjax.parallel import rules
from musicjax.train import runs

logger = logging.getLogger('musicjax.lm')
# The tasks whose runs generate songs (a DPO-tuned run is still an LM).
LM_TASKS = ('lm', 'lm_dpo')
# Tag values seen in training are collected from at most this many records.
_KNOWN_TAG_RECORDS = 10000


@dataclasses.dataclass
class SongRequest:
  tags: str = ''                  # 'genre: chorale; mood: bright' or 'chorale, bright'
  lyrics: str = ''                # text with [verse]/[chorus] markers
  melody_path: str = ''           # audio whose chroma guides the melody
  reference_path: str = ''        # audio whose style guides the song
  seconds: float | None = 10.0    # None: config.sample.seconds (the CLI)
  min_seconds: float = 0.0        # the song does not end before this
  seed: int = 0
  cfg_scale: float | None = None  # None: config.sample.cfg_scale
  temperature: float | None = None
  top_k: int | None = None
  top_p: float | None = None


class TokenSet:
  """What generation needs of the token set a run was trained on: its facts
  (dataset.json), the codec that made it (restored on first use), the tags
  seen in training, and audio loading at the codec's rate."""

  def __init__(self, data_path: str, info: dict[str, Any],
               codec_workdir: str | None = None):
    self.data_path, self.info = data_path, info
    self.codec_workdir = codec_workdir or info.get('codec_workdir', '')
    self._codec = None
    self._known_tags = None

  @property
  def frame_rate(self) -> float:
    return float(self.info['frame_rate'])

  def codec(self):
    if self._codec is None:
      if not self.codec_workdir or not os.path.isdir(self.codec_workdir):
        raise UserError(
            f'the codec workdir {self.codec_workdir!r} (from '
            f'{self.data_path}/dataset.json) is not there; pass '
            '--codec-workdir with the codec that made the tokens')
      self._codec = runs.load_run(self.codec_workdir, expect='codec',
                                  flag='--codec-workdir').model
    return self._codec

  def known_tags(self) -> set[str]:
    if self._known_tags is None:
      known = set()
      ds = token_records.source(os.path.expanduser(self.data_path), 'train')
      for i in range(min(len(ds), _KNOWN_TAG_RECORDS)):
        rec = ds[i]
        if 'meta' in rec:
          for values in song_text.derive_tags(rec['meta']).values():
            known.update(values)
      self._known_tags = known
    return self._known_tags

  def load_wave(self, path: str) -> np.ndarray:
    if not os.path.isfile(path):
      raise UserError(f'audio file not found: {path}')
    try:
      return audio.load_audio(path, int(self.info['sample_rate']),
                              int(self.info.get('channels', 1)))
    except audio.BadAudio as e:
      raise UserError(str(e)) from None


class TokenSetAccess:
  """What a generation context reads of its token dataset, `self.tokens`
  (shared by SongContext and the accompaniment's context)."""
  tokens: TokenSet

  @property
  def frame_rate(self) -> float:
    return self.tokens.frame_rate

  def codec(self):
    return self.tokens.codec()

  def known_tags(self) -> set[str]:
    return self.tokens.known_tags()

  def load_wave(self, path: str) -> np.ndarray:
    return self.tokens.load_wave(path)


class SongContext(TokenSetAccess):
  """A restored LM run with its tokenizer and its token set (`TokenSet`)."""

  def __init__(self, config, workdir: str, codec_workdir: str | None = None,
               step: int | None = None):
    self.run = runs.serving(runs.load_run(
        workdir, step, config=config, expect=LM_TASKS, verb='generate'))
    config = self.config = self.run.config   # None given: the run's own
    self.mesh, self.rules = self.run.mesh, self.run.rules
    self.model = self.run.model
    self.tokens = TokenSet(config.data.path, token_data.check_dataset(config),
                           codec_workdir)
    self.info, self.codec_workdir = self.tokens.info, self.tokens.codec_workdir
    self.text = token_data.condition_text(config)



def _say(msg: str) -> None:
  print(f'[generate] {msg}', file=sys.stderr, flush=True)


def _tags_text(ctx: SongContext, tags: str) -> str | None:
  if not tags.strip():
    _say('no tags given: unconditional for tags')
    return None
  parsed = song_text.derive_tags({'tags': tags})
  unknown = sorted({v for vs in parsed.values() for v in vs} - ctx.known_tags())
  if unknown:
    _say(f'WARNING: tags never seen in training: {", ".join(unknown)} (the '
         'model may ignore them)')
  return song_text.format_tags(parsed) or None


def _melody(ctx: SongContext, path: str, frames: int) -> np.ndarray:
  if not path:
    return np.full((frames,), layout.MELODY_NULL, np.int32)
  wave = ctx.load_wave(path)
  chroma = melody_lib.chroma_tokens(wave, int(ctx.info['sample_rate']),
                                    int(ctx.info['hop_length']))
  ids = sequence.melody_ids(chroma, frames, dropped=False)
  return np.concatenate([ids, np.full((frames - len(ids),), layout.MELODY_NULL,
                                      np.int32)])


def reference_codes(ctx: SongContext, path: str) -> np.ndarray | None:
  r = ctx.config.data.reference_frames
  if not path:
    return None
  if not r:
    _say('WARNING: this model was trained without a reference condition '
         '(config.data.reference_frames = 0); --reference is ignored')
    return None
  codes = chunked.encode_array(ctx.codec(), ctx.load_wave(path))
  codes = codes[:, :ctx.config.model.num_codebooks].astype(np.int32)
  if len(codes) < r:  # shorter than the training segment: pad with EMPTY
    codes = np.concatenate([codes, np.full((r - len(codes), codes.shape[1]),
                                           layout.EMPTY, np.int32)])
  mid = (len(codes) - r) // 2
  return codes[mid:mid + r]


def build_inputs(ctx: SongContext, req: SongRequest, frames: int, cfg: bool):
  """Prompt rows (cond, then null-condition rows with CFG) and loop inputs."""
  c = ctx.config
  budget = c.data.max_text_tokens
  tags = _tags_text(ctx, req.tags)
  secs = song_text.parse_lyrics_file(req.lyrics) if req.lyrics else []
  if not secs:
    _say('no lyrics given: unconditional for lyrics')
  ref = reference_codes(ctx, req.reference_path)
  mel = _melody(ctx, req.melody_path, frames)
  t = ctx.text
  rows, sections = [], []
  variants = [True, False] if cfg else [True]
  for conditional in variants:
    tg = tags if conditional else None
    has_ref = conditional and ref is not None
    if c.data.layout == 'prefix':
      lyr = '\n'.join(f'{m}\n{x}' if x else m for m, x in secs) if (
          conditional and secs) else None
      rows.append(t.prefix(tg, lyr, has_ref, budget))
      continue
    head = t.global_style(tg, has_ref, budget // 2)
    texts = [f'{m} {x}'.strip() for m, x in secs] or [None]
    share = max((budget - len(head)) // len(texts), 2)
    ids = [t.section(x if conditional else None, share) for x in texts]
    rows.append(head + ids[0])
    sections.append(ids[1:])
  length = max(len(r) for r in rows)
  prompt = [sequence.left_pad(sequence.assemble(
      [sequence.TextPart(r)], len(r), c.model.num_codebooks,
      c.model.codebook_size), length) for r in rows]
  prompt = {k: np.stack([p[k] for p in prompt]) for k in prompt[0]}
  out = {'prompt': prompt,
         'melody': np.stack([mel] + ([np.full_like(mel, layout.MELODY_NULL)]
                                     if cfg else []))}
  if sections and sections[0]:
    ls = max(len(s) for rows_ in sections for s in rows_)
    out['sections'] = np.asarray(
        [[[layout.EMPTY] * (ls - len(s)) + s for s in rows_] for rows_ in sections],
        np.int32)
  if c.data.reference_frames:
    r = c.data.reference_frames
    empty = np.full((r, c.model.num_codebooks), layout.EMPTY, np.int32)
    out['ref_codes'] = np.stack([ref if ref is not None else empty] +
                                ([empty] if cfg else []))
    out['ref_valid'] = np.asarray([ref is not None] + ([False] if cfg else []))
  return out


class FrameProgress:
  """Streaming callback that prints frames done, speed and ETA (on stderr)."""

  def __init__(self, total: int, frame_rate: float):
    self.total, self.frame_rate = total, frame_rate
    self.t0 = time.perf_counter()

  def __call__(self, frames, counts):
    del frames
    n = int(np.asarray(counts)[0])
    dt = time.perf_counter() - self.t0
    rate = n / max(dt, 1e-9)
    eta = (self.total - n) / max(rate, 1e-9)
    _say(f'{n}/{self.total} frames ({n / self.frame_rate:.1f} s of audio), '
         f'{rate:.1f} frames/s, ETA {eta:.0f}s')


class _Both:
  """Two streaming callbacks in one (progress line, then the caller's)."""

  def __init__(self, first, second):
    self.first, self.second = first, second

  def __call__(self, frames, counts):
    self.first(frames, counts)
    self.second(frames, counts)


def sample_codes(ctx: SongContext, req: SongRequest, progress: bool = True,
                 stream: Callable[[Any, Any], None] | None = None,
                 stream_seconds: float = 2.0):
  """Generates codes [frames, K] for one request (one compiled loop).

  `stream(frames [1, F, K], counts [1])` runs on the host every
  `stream_seconds` of generated audio, with the codes so far (the first
  `counts[0]` frames are final), e.g. to play the song while it generates.
  """
  c = ctx.config
  s = c.sample
  frames = int(round(req.seconds * ctx.frame_rate))
  if frames < 1:
    raise UserError(f'--seconds {req.seconds} gives no frames at '
                    f'{ctx.frame_rate:g} Hz')
  scale = s.cfg_scale if req.cfg_scale is None else req.cfg_scale
  cfg = scale != 1.0
  inputs = build_inputs(ctx, req, frames, cfg)
  p = inputs['prompt']['text'].shape[1]
  ns, ls = inputs['sections'].shape[1:] if 'sections' in inputs else (0, 0)
  slots = p + frames + ns * (ls + 1) + 1
  if slots > c.model.max_seq_len:
    limit = (c.model.max_seq_len - p - ns * (ls + 1) - 1) / ctx.frame_rate
    raise UserError(
        f'{req.seconds:g} s needs {slots} sequence slots, more than this '
        f'model\'s config.model.max_seq_len={c.model.max_seq_len}; at most '
        f'{max(limit, 0):.1f} s with these conditions')
  every = (max(1, int(ctx.frame_rate * stream_seconds))
           if progress or stream else 0)
  overrides = {name: getattr(req, name) for name in ('temperature', 'top_k', 'top_p')
               if getattr(req, name) is not None}
  min_frames = min(frames, int(round(req.min_seconds * ctx.frame_rate)))
  sampling = gen.sampling_from_config(
      s, cfg_scale=scale, max_frames=frames, min_frames=min_frames,
      stream_every=every, **gen.model_classes(c.model), **overrides)
  cb = FrameProgress(frames, ctx.frame_rate) if progress else None
  if stream is not None:
    cb = _Both(cb, stream) if cb else stream
  fn = gen.make_generate_fn(ctx.model, sampling, num_cond=1, callback=cb)
  j = lambda x: None if x is None else jnp.asarray(x)
  with jax.set_mesh(ctx.mesh), rules.use_rules(ctx.rules):
    out = fn({k: jnp.asarray(v) for k, v in inputs['prompt'].items()},
             jax.random.key(req.seed), j(inputs.get('sections')),
             j(inputs['melody']), j(inputs.get('ref_codes')),
             j(inputs.get('ref_valid')))
  n = int(out['num_frames'][0])
  return np.asarray(out['codes'])[0, :n]


def spectrogram_png(wave: np.ndarray, sr: int, path: str, title: str) -> None:
  plots.save_spectrograms({title: wave}, sr, path)


def generate_song(ctx: SongContext, req: SongRequest, out_path: str) -> dict[str, Any]:
  """Writes OUT (wav), OUT.npz (codes) and OUT.png (spectrogram); the codes
  first, so a failed decode keeps the generation; each file whole or not at
  all."""
  t0 = time.perf_counter()
  codes = sample_codes(ctx, req)
  t_gen = time.perf_counter() - t0
  sr = int(ctx.info['sample_rate'])
  base = os.path.splitext(out_path)[0]
  fileio.write_npz(base + '.npz', codes=codes.astype(np.int32),
                   frame_rate=ctx.frame_rate, sample_rate=sr,
                   request=json.dumps(dataclasses.asdict(req)))
  codec = ctx.codec()
  wave = chunked.decode_array(codec, codes) if len(codes) else np.zeros((0, 1))
  fileio.write_with(out_path, lambda tmp: sf.write(
      tmp, np.clip(wave, -1, 1), sr, format='WAV'))
  fileio.write_with(base + '.png', lambda tmp: spectrogram_png(
      wave[:, 0] if len(wave) else np.zeros(16), sr, tmp,
      f'tags: {req.tags or "-"} | seed {req.seed}'), suffix='.png')
  return {'out': out_path, 'frames': int(len(codes)),
          'seconds': len(codes) / ctx.frame_rate,
          'generate_seconds': round(t_gen, 2), 'tokens': base + '.npz',
          'spectrogram': base + '.png'}
