"""Audio metrics of a trained accomp run on held-out songs (`musicjax eval`).

For each of the first `songs` eval-split songs that have stems, the first
`seconds` of its vocal codes are accompanied (text tags from the metadata, no
reference: the zero-shot setting), decoded with the codec, and compared with
the TRUE accompaniment audio (the stem file the tokens were made from; the
decoded true tokens when that file is gone) by onset F1 (50 ms), beat F1 and
chroma correlation (musicjax/eval/accomp_metrics.py). The same metrics,
computed the same way against the same reference, are reported for:
  codec_ceiling  the true accompaniment tokens decoded (the best any model on
                 these tokens can do)
  other_song     the true accompaniment of a different held-out song
  silence        zeros
  vocal_copy     the vocal itself
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import soundfile as sf

from musicjax.accomp import song as song_lib
from musicjax.codec import chunked
from musicjax.data import song_text
from musicjax.data import token_records
from musicjax.errors import UserError
from musicjax.eval import accomp_metrics

STEM_KEYS = ('vocal_codes', 'accompaniment_codes')
# Clips written next to the table (the first few songs).
CLIPS_WRITTEN = 3


def _say(msg: str) -> None:
  print(f'[eval accomp] {msg}', file=sys.stderr, flush=True)


def _stem_wave(ctx, meta: dict, stem: str, codes: np.ndarray, n: int) -> np.ndarray:
  """The stem's audio [n] at the codec rate: the source file if it is still
  there, else the decoded codes."""
  path = (meta.get('stem_origins') or {}).get(stem)
  if isinstance(path, str) and os.path.isfile(path):
    wave = ctx.load_wave(path)[:, 0]
  else:
    wave = chunked.decode_array(ctx.codec(), codes, progress=False)[:, 0]
  return np.pad(wave[:n], (0, max(n - len(wave), 0))).astype(np.float32)


def held_out_songs(config, songs: int, frames: int) -> list[dict]:
  """The first `songs` eval records with stems and at least `frames` frames
  (shorter songs are skipped so every clip has the same length)."""
  ds = token_records.source(os.path.expanduser(config.data.path), 'eval')
  out, short = [], 0
  for i in range(len(ds)):
    rec = ds[i]
    if 'error' in rec or not all(k in rec for k in STEM_KEYS):
      continue
    if len(rec['vocal_codes']) < frames:
      short += 1
      continue
    out.append(rec)
    if len(out) == songs:
      break
  if len(out) < 2:
    raise UserError(
        f'eval needs at least 2 held-out songs with stems and >= {frames} '
        f'frames in {config.data.path} (found {len(out)}; {short} shorter); '
        'lower --seconds or prepare more data with --stems')
  if len(out) < songs:
    _say(f'only {len(out)} held-out songs qualify ({short} shorter than the clip)')
  return out


def evaluate_audio(config, workdir: str, songs: int = 8, seconds: float = 10.0,
                   steps: int | None = None, out_dir: str = '',
                   seed: int = 0) -> dict:
  """Mean metrics per system (module docstring) and the Markdown table."""
  ctx = song_lib.AccompContext(config, workdir)
  rate = ctx.frame_rate
  frames = int(round(seconds * rate))
  if frames < 1:
    raise UserError(f'--seconds {seconds} gives no frames at {rate:g} Hz')
  recs = held_out_songs(config, songs, frames)
  sr = int(ctx.info['sample_rate'])
  n = frames * int(round(sr / rate))
  req = song_lib.AccompRequest(vocal_path='', steps=steps, seed=seed)
  s = song_lib.sampling_for(config, req)
  k = config.model.num_codebooks
  truth, vocals, gens, ceilings = [], [], [], []
  t0 = time.perf_counter()
  for i, rec in enumerate(recs):
    meta = rec.get('meta', {})
    voc_codes = np.asarray(rec['vocal_codes'])[:frames, :k]
    acc_codes = np.asarray(rec['accompaniment_codes'])[:frames, :k]
    text = ctx.tag_ids(song_text.derive_tags(meta))
    codes = song_lib.accompany_codes(ctx, voc_codes, text, None, s,
                                     seed + i, progress=False)
    gens.append(_pad(chunked.decode_array(ctx.codec(), codes,
                                          progress=False)[:, 0], n))
    ceilings.append(_pad(chunked.decode_array(ctx.codec(), acc_codes,
                                              progress=False)[:, 0], n))
    truth.append(_stem_wave(ctx, meta, 'accompaniment', acc_codes, n))
    vocals.append(_stem_wave(ctx, meta, 'vocal', voc_codes, n))
    done = time.perf_counter() - t0
    _say(f'{i + 1}/{len(recs)} songs, {done:.0f}s elapsed, ETA '
         f'{done / (i + 1) * (len(recs) - i - 1):.0f}s')
  rows = {name: [] for name in ('model', 'codec_ceiling') +
          accomp_metrics.BASELINE_KEYS}
  for i in range(len(recs)):
    other = truth[(i + 1) % len(recs)]
    rows['model'].append(accomp_metrics.compare(truth[i], gens[i], sr))
    rows['codec_ceiling'].append(accomp_metrics.compare(truth[i], ceilings[i], sr))
    for name, row in accomp_metrics.baseline_rows(vocals[i], truth[i], other,
                                                  sr).items():
      rows[name].append(row)
  means = {name: accomp_metrics.mean_rows(r) for name, r in rows.items()}
  table = accomp_metrics.format_table(means)
  result = {'songs': len(recs), 'seconds': seconds, 'steps': s.steps,
            'cfg_scale': s.cfg_scale, 'decode': config.model.decode,
            'metrics': means, 'table': table}
  if out_dir:
    _write(out_dir, result, recs, vocals, gens, truth, sr)
  _say('\n' + table)
  return result


def _pad(x: np.ndarray, n: int) -> np.ndarray:
  return np.pad(x[:n], (0, max(n - len(x), 0))).astype(np.float32)


def _write(out_dir, result, recs, vocals, gens, truth, sr) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'accomp_eval.md'), 'w', encoding='utf-8') as f:
    f.write(result['table'] + '\n')
  with open(os.path.join(out_dir, 'accomp_eval.json'), 'w', encoding='utf-8') as f:
    json.dump({k: v for k, v in result.items() if k != 'table'}, f, indent=1)
  for i in range(min(CLIPS_WRITTEN, len(recs))):
    name = str(recs[i].get('meta', {}).get('id', i)).replace(os.sep, '_')
    sf.write(os.path.join(out_dir, f'{name}_generated_mix.wav'),
             np.clip(vocals[i] + gens[i], -1, 1), sr)
    sf.write(os.path.join(out_dir, f'{name}_true_mix.wav'),
             np.clip(vocals[i] + truth[i], -1, 1), sr)

