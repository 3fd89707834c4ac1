"""Songs from a released HeartMuLa run: text -> codes -> HeartCodec -> wav.

The run is what `musicjax import-heartmula` writes (export/import_heartmula.py
builds a `ReleasedSong` from it): the LM run, the released tokenizer and
gen_config.json, and HeartCodec's decoder. Generation follows heartlib's
pipeline: the prompt of heartmula_prompt.py, guidance and top-k from
config.sample, a song that ends at the first frame holding a code >= END,
then HeartCodec's windowed flow-matching decode at the codec's sample rate.

One deliberate difference: the special classes between the codebook and END
(the released vocabulary's extra rows) are never sampled, since HeartCodec
cannot decode them (heartlib would hand them on to it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf

from musicjax import fileio
from musicjax.codec.heartcodec.decoder import HeartCodecDecoder
from musicjax.errors import UserError
from musicjax.lm import generate as gen
from musicjax.lm import heartmula_prompt
from musicjax.lm import song
from musicjax.train import runs


def _say(msg: str) -> None:
  print(f'[generate] {msg}', file=sys.stderr, flush=True)


@dataclasses.dataclass
class ReleasedSong:
  """An imported HeartMuLa run with the files generation reads."""
  run: runs.Run
  tokenizer_path: str
  gen_config_path: str
  codec: HeartCodecDecoder
  codec_folder: str

  def __post_init__(self):
    m, q = self.run.config.model, self.codec.config.codes
    if (int(q.num_quantizers), int(q.codebook_size)) != (
        int(m.num_codebooks), int(m.codebook_size)):
      raise UserError(
          f'the HeartCodec in {self.codec_folder} has {q.num_quantizers} x '
          f'{q.codebook_size} codes but the LM in {self.run.workdir} makes '
          f'{m.num_codebooks} x {m.codebook_size}: pass --codec-workdir with '
          'the HeartCodec folder released beside this HeartMuLa')

  @property
  def config(self):
    return self.run.config

  @property
  def frame_rate(self) -> float:
    return float(self.codec.config.code_rate_hz)

  @property
  def sample_rate(self) -> int:
    return int(self.codec.config.sample_rate)


def check_request(req: song.SongRequest) -> None:
  """Inputs the released model does not take, named by their flags."""
  for given, flag, why in (
      (req.melody_path, '--melody', 'the released model has no melody input'),
      (req.reference_path, '--reference',
       'heartlib gives the released model no reference audio (its MuQ-MuLan '
       'embedding is zeros); a run fine-tuned with references takes one')):
    if given:
      raise UserError(f'{flag}: {why}')


def sample_codes(ctx: ReleasedSong, req: song.SongRequest,
                 progress: bool = True) -> np.ndarray:
  """Codes [frames, K] of one song (one compiled loop), END frame excluded."""
  check_request(req)
  c = ctx.config
  frames = int(round(req.seconds * ctx.frame_rate))
  if frames < 1:
    raise UserError(f'--seconds {req.seconds} gives no frames at '
                    f'{ctx.frame_rate:g} Hz')
  scale = c.sample.cfg_scale if req.cfg_scale is None else req.cfg_scale
  inputs = heartmula_prompt.from_files(ctx.tokenizer_path, ctx.gen_config_path,
                                       c.model, req.tags, req.lyrics,
                                       cfg=scale != 1.0)
  p = inputs['prompt']['text'].shape[1]
  if p + frames + 1 > c.model.max_seq_len:
    limit = (c.model.max_seq_len - p - 1) / ctx.frame_rate
    raise UserError(
        f'{req.seconds:g} s needs {p + frames + 1} sequence slots ({p} of '
        f'tags and lyrics), more than config.model.max_seq_len='
        f'{c.model.max_seq_len}; at most {max(limit, 0):.1f} s with this text')
  overrides = {name: getattr(req, name) for name in ('temperature', 'top_k',
                                                     'top_p')
               if getattr(req, name) is not None}
  sampling = gen.sampling_from_config(
      c.sample, cfg_scale=scale, max_frames=frames,
      min_frames=min(frames, int(round(req.min_seconds * ctx.frame_rate))),
      stream_every=max(1, int(2 * ctx.frame_rate)) if progress else 0,
      **gen.model_classes(c.model),
      **overrides)
  cb = song.FrameProgress(frames, ctx.frame_rate) if progress else None
  fn = gen.make_generate_fn(ctx.run.model, sampling, num_cond=1, callback=cb)
  with ctx.run.activate():
    out = fn({k: jnp.asarray(v) for k, v in inputs['prompt'].items()},
             jax.random.key(req.seed), ref_codes=jnp.asarray(inputs['ref_embed']),
             ref_valid=jnp.asarray(inputs['ref_valid']))
  n = int(out['num_frames'][0])
  return np.asarray(out['codes'])[0, :n]


def generate_song(ctx: ReleasedSong, req: song.SongRequest, out_path: str,
                  progress: bool = True) -> dict[str, Any]:
  """Writes OUT (wav at the codec's rate), OUT.npz (codes) and OUT.png.

  The codes are saved first, so a failed decode keeps the generation; each
  file appears whole or not at all.
  """
  t0 = time.perf_counter()
  codes = sample_codes(ctx, req, progress)
  t_gen = time.perf_counter() - t0
  base = os.path.splitext(out_path)[0]

  fileio.write_npz(base + '.npz', codes=codes.astype(np.int32),
                   frame_rate=ctx.frame_rate, sample_rate=ctx.sample_rate,
                   request=json.dumps(dataclasses.asdict(req)))
  sr = ctx.sample_rate
  t0 = time.perf_counter()
  if len(codes):
    def window(done, total):
      if progress:
        _say(f'HeartCodec: window {done}/{total}, '
             f'{time.perf_counter() - t0:.0f}s')
    wave = ctx.codec.detokenize(codes[None], rng=jax.random.key(req.seed),
                                on_window=window)[0]
  else:
    _say('the song ended before its first frame: writing silence')
    wave = np.zeros((0, int(ctx.codec.config.scalar.channels)), np.float32)
  t_dec = time.perf_counter() - t0
  fileio.write_with(out_path, lambda tmp: sf.write(
      tmp, np.clip(wave, -1, 1), sr, format='WAV'))
  fileio.write_with(base + '.png', lambda tmp: song.spectrogram_png(
      wave[:, 0] if len(wave) else np.zeros(16), sr, tmp,
      f'tags: {req.tags or "-"} | seed {req.seed}'), suffix='.png')
  return {'out': out_path, 'frames': int(len(codes)),
          'seconds': len(codes) / ctx.frame_rate, 'sample_rate': sr,
          'generate_seconds': round(t_gen, 2),
          'decode_seconds': round(t_dec, 2), 'tokens': base + '.npz',
          'spectrogram': base + '.png', 'codec': ctx.codec_folder}
