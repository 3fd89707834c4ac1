"""`musicjax prefs`: preference pairs for DPO, sampled from a trained LM.

Seed 001 §3.3.3 builds DPO data by "divergent sampling": for every prompt the
model generates several candidates (four), an offline metric scores them, the
best becomes the winner and the worst the loser, and the pair is kept only if
the scores are far enough apart (a margin) and the winner is good enough
(a floor). The metrics there (MuQ similarity, phoneme error rate, AudioBox)
need large pretrained models; here the offline metric is one that needs
nothing but the codec:

  chroma  fraction of the prompt melody's voiced frames whose chroma class
          (codec-decoded candidate -> `musicjax.data.melody.chroma_tokens`)
          equals the prompt's melody class: how well the song follows the
          melody condition.

Prompts are token records (tags, lyrics and melody of real songs) of the
LM's token dataset. All candidates of a prompt come from one batched
generate call (the rows sample independently). Pairs are written in the
format DPO reads (musicjax/lm/dpo_pairs.py): JSONL (OUT ends in .jsonl) or ArrayRecord
shards (OUT is a directory).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from musicjax import config as config_lib
from musicjax.codec import chunked
from musicjax.data import melody as melody_lib
from musicjax.data import song_text
from musicjax.data import token_records
from musicjax.errors import UserError
from musicjax.lm import dpo_pairs
from musicjax.lm import generate as gen
from musicjax.lm import layout
from musicjax.lm import sequence
from musicjax.lm import song
from musicjax.parallel import rules

DEFAULT_CANDIDATES = 4        # seed 001 §3.3.3
DEFAULT_MARGIN = 0.1          # winner score - loser score must exceed this
DEFAULT_MIN_WINNER = 0.0      # the winner's score must exceed this
SHARD_PATTERN = 'pairs-{shard:05d}' + dpo_pairs.SHARD_SUFFIX
_TMP_SUFFIX = '.tmp'


@dataclasses.dataclass
class Prompt:
  tags: str = ''                      # 'genre: chorale; mood: bright'
  lyrics: str = ''                    # '[verse]\nline ...'
  melody: np.ndarray | None = None    # chroma class per frame, -1 = silent
  source: str = ''                    # where the prompt came from (record name)


# ----------------------------------------------------------------- scoring


def chroma_score(candidate: np.ndarray, melody: np.ndarray) -> float:
  """Fraction of the melody's voiced frames (class >= 0) where the candidate's
  chroma class is the same. Frames the candidate lacks count as misses;
  silent melody frames are left out. NaN when the melody has no voiced frame."""
  melody = np.asarray(melody)
  candidate = np.asarray(candidate)
  voiced = melody >= 0
  if not voiced.any():
    return math.nan
  n = min(len(candidate), len(melody))
  hit = np.zeros(len(melody), bool)
  hit[:n] = candidate[:n] == melody[:n]
  return float(np.sum(hit & voiced) / np.sum(voiced))


def select_pair(scores: Sequence[float], *, margin: float,
                min_winner: float) -> tuple[int, int] | None:
  """(winner, loser) indices: best and worst finite score, if best - worst >
  margin and best > min_winner; else None (NaN scores are left out)."""
  s = np.asarray(scores, np.float64)
  ok = np.flatnonzero(np.isfinite(s))
  if len(ok) < 2:
    return None
  w = int(ok[np.argmax(s[ok])])
  l = int(ok[np.argmin(s[ok])])
  if s[w] - s[l] > margin and s[w] > min_winner:
    return w, l
  return None


def candidate_chroma(ctx, codes: np.ndarray) -> np.ndarray:
  """Chroma class per frame of a candidate, decoded with the codec."""
  wave = chunked.decode_array(ctx.codec(), codes, progress=False)
  return melody_lib.chroma_tokens(wave, int(ctx.info['sample_rate']),
                                  int(ctx.info['hop_length']))


def _chroma_metric(ctx, codes: np.ndarray, prompt_chroma: np.ndarray) -> float:
  return chroma_score(candidate_chroma(ctx, codes), prompt_chroma)


# metric name -> score(ctx, codes [F, K], prompt chroma [frames]) (higher = better)
METRICS: dict[str, Callable[..., float]] = {'chroma': _chroma_metric}


# ---------------------------------------------------------------- sampling


def _frames(seconds: float, frame_rate: float) -> int:
  frames = int(round(seconds * frame_rate))
  if frames < 1:
    raise UserError(f'--seconds {seconds} gives no frames at {frame_rate:g} Hz')
  return frames


class _Sampler:
  """All candidates of one prompt in one compiled generate call: the cond
  rows (then the CFG null rows) are copies of the prompt, left-padded to
  data.max_text_tokens so every prompt reuses one compilation."""

  def __init__(self, ctx, candidates: int, frames: int):
    c = ctx.config
    s = c.sample
    self.ctx, self.n, self.frames = ctx, candidates, frames
    self.cfg = s.cfg_scale != 1.0
    sampling = gen.sampling_from_config(s, max_frames=frames,
                                        **gen.model_classes(c.model))
    self.fn = gen.make_generate_fn(ctx.model, sampling, num_cond=candidates)

  def _row(self, ids: list[int]) -> dict[str, np.ndarray]:
    m = self.ctx.config.model
    ex = sequence.assemble([sequence.TextPart(ids)], len(ids), m.num_codebooks,
                           m.codebook_size)
    return sequence.left_pad(ex, self.ctx.config.data.max_text_tokens)

  def __call__(self, ids: list[int], melody_ids: np.ndarray, rng: jax.Array):
    """Candidates [codes [F_i, K]] and whether each ended with END."""
    ctx, n = self.ctx, self.n
    c = ctx.config
    budget = c.data.max_text_tokens
    rows = [self._row(ids)] * n
    mel = [melody_ids] * n
    if self.cfg:
      rows += [self._row(ctx.text.prefix(None, None, False, budget))] * n
      mel += [np.full_like(melody_ids, layout.MELODY_NULL)] * n
    prompt = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    ref_codes = ref_valid = None
    r = c.data.reference_frames
    if r:
      ref_codes = np.full((len(rows), r, c.model.num_codebooks), layout.EMPTY,
                          np.int32)
      ref_valid = np.zeros((len(rows),), bool)
    with jax.set_mesh(ctx.mesh), rules.use_rules(ctx.rules):
      out = self.fn(prompt, rng, None, np.stack(mel), ref_codes, ref_valid)
    codes = np.asarray(out['codes'])
    counts = np.asarray(out['num_frames'])
    # The loop stops at END or after `frames` frames: fewer means END.
    return ([codes[i, :counts[i]] for i in range(n)],
            [bool(counts[i] < self.frames) for i in range(n)])


# ----------------------------------------------------------------- writing


class _JsonlWriter:
  """pairs.jsonl, written to a temporary name and moved into place at close."""

  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._f = open(path + _TMP_SUFFIX, 'w', encoding='utf-8')

  def write(self, pair: dict[str, Any], info: dict[str, Any]) -> None:
    obj = {'tags': pair['tags'], 'lyrics': pair['lyrics']}
    if pair['melody'] is not None:
      obj['melody'] = np.asarray(pair['melody']).tolist()
    for side in dpo_pairs.SIDES:
      obj[side] = np.asarray(pair[side]).tolist()
      obj[f'{side}_end'] = bool(pair[f'{side}_end'])
    obj.update(info)
    self._f.write(json.dumps(obj, ensure_ascii=False) + '\n')

  def close(self) -> None:
    self._f.close()
    os.replace(self.path + _TMP_SUFFIX, self.path)


class _ShardWriter:
  """DIR/pairs-NNNNN.array_record, `per_shard` pairs each."""

  def __init__(self, directory: str, per_shard: int):
    self.dir, self.per_shard = directory, max(int(per_shard), 1)
    os.makedirs(directory, exist_ok=True)
    stale = [f for f in os.listdir(directory) if f.endswith(dpo_pairs.SHARD_SUFFIX)]
    if stale:
      raise UserError(f'--out {directory} already holds pair shards '
                      f'({stale[0]}, ...); use an empty directory')
    self._writer, self._count, self._shard = None, 0, 0

  def _path(self) -> str:
    return os.path.join(self.dir, SHARD_PATTERN.format(shard=self._shard))

  def write(self, pair: dict[str, Any], info: dict[str, Any]) -> None:
    if self._writer is None:
      self._writer = array_record_module.ArrayRecordWriter(
          self._path() + _TMP_SUFFIX, token_records.WRITER_OPTIONS)
    self._writer.write(dpo_pairs.encode_pair_record(pair, info))
    self._count += 1
    if self._count == self.per_shard:
      self._finish()

  def _finish(self) -> None:
    if self._writer is not None:
      self._writer.close()
      os.replace(self._path() + _TMP_SUFFIX, self._path())
      self._writer, self._count = None, 0
      self._shard += 1

  def close(self) -> None:
    self._finish()


def _writer(out_path: str, records_per_shard: int):
  if out_path.endswith(dpo_pairs.JSONL_SUFFIX):
    return _JsonlWriter(out_path)
  if os.path.splitext(out_path.rstrip(os.sep))[1]:
    raise UserError(f'--out {out_path}: give a {dpo_pairs.JSONL_SUFFIX} file or a '
                    'directory (for ArrayRecord shards)')
  return _ShardWriter(out_path, records_per_shard)


# ------------------------------------------------------------------- pairs


def build_pairs(ctx, prompts: Sequence[Prompt], *,
                candidates: int = DEFAULT_CANDIDATES, seconds: float,
                metric: str = 'chroma', margin: float = DEFAULT_MARGIN,
                min_winner: float = DEFAULT_MIN_WINNER, seed: int = 0,
                out_path: str) -> dict[str, Any]:
  """Samples `candidates` songs per prompt, scores them with `metric`, writes
  the (best, worst) pairs that pass the margins to `out_path`.

  Args:
    ctx: a `musicjax.lm.song.SongContext` (model, tokenizer, codec).
    prompts: tags, lyrics and melody of each prompt.
    candidates: samples per prompt (>= 2).
    seconds: length of each sample (it may end earlier with END).
    metric: a key of METRICS.
    margin: keep a pair only if best - worst > margin.
    min_winner: ... and best > min_winner.
    seed: sampling seed (prompt i uses fold_in(seed, i)).
    out_path: pairs.jsonl, or a directory for ArrayRecord shards.

  Returns:
    {'prompts', 'pairs', 'mean_margin', 'skipped_no_melody', 'out'}.
  """
  c = ctx.config
  if candidates < 2:
    raise UserError(f'--candidates must be >= 2 (a winner and a loser), got '
                    f'{candidates}')
  if metric not in METRICS:
    raise UserError(f'--metric {metric!r} is unknown; known: {sorted(METRICS)}')
  frames = _frames(seconds, ctx.frame_rate)
  slots = c.data.max_text_tokens + frames + 1
  if slots > c.model.max_seq_len:
    raise UserError(f'--seconds {seconds:g} needs {slots} sequence slots, more '
                    f'than config.model.max_seq_len={c.model.max_seq_len}')
  score = METRICS[metric]
  sampler = _Sampler(ctx, candidates, frames)
  writer = _writer(out_path, c.data.records_per_shard)
  key = jax.random.key(seed)
  kept, margins, skipped = 0, [], 0
  bar = tqdm(prompts, desc='prefs', unit='prompt')
  try:
    for i, p in enumerate(bar):
      # The prompt melody over the sampled frames: chroma (-1 = none) for the
      # metric, melody ids for the sampler (and for DPO, from the same list).
      chroma = np.full((frames,), -1, np.int32)
      if p.melody is not None:
        given = np.asarray(p.melody, np.int32)[:frames]
        chroma[:len(given)] = given
      if not (chroma >= 0).any():
        skipped += 1
        continue
      ids = dpo_pairs.prompt_ids(ctx.text, p.tags, p.lyrics, c.data.max_text_tokens)
      mel_ids = dpo_pairs.melody_ids(chroma, frames, c.cond.melody)
      codes, ended = sampler(ids, mel_ids, jax.random.fold_in(key, i))
      # An empty candidate (END first) cannot be a DPO sequence: no score.
      scores = [score(ctx, x, chroma) if len(x) else math.nan for x in codes]
      pick = select_pair(scores, margin=margin, min_winner=min_winner)
      if pick is not None:
        w, l = pick
        pair = {'tags': p.tags, 'lyrics': p.lyrics, 'melody': chroma,
                'winner': codes[w], 'loser': codes[l],
                'winner_end': ended[w], 'loser_end': ended[l]}
        writer.write(pair, {'scores': [None if math.isnan(x) else x
                                       for x in scores],
                            'metric': metric, 'source': p.source,
                            'seed': seed})
        kept += 1
        margins.append(scores[w] - scores[l])
      bar.set_postfix(pairs=kept)
  finally:
    writer.close()
  return {'prompts': len(prompts), 'pairs': kept,
          'mean_margin': float(np.mean(margins)) if margins else 0.0,
          'skipped_no_melody': skipped, 'out': out_path}


def tags_string(tags: dict[str, list[str]]) -> str:
  """{category: [values]} -> 'genre: chorale, baroque; mood: bright' (what
  `song_text.derive_tags({'tags': ...})` parses back)."""
  return '; '.join(f'{c}: {", ".join(v)}' for c, v in tags.items() if v)


def prompts_from_tokens(config, split: str, num_prompts: int, frames: int,
                        frame_rate: float) -> list[Prompt]:
  """Prompts from the first `num_prompts` usable records of a token split:
  all tags, the lyrics of the sections in the first `frames` frames, the melody."""
  ds = token_records.source(os.path.expanduser(config.data.path), split)
  out = []
  for i in range(len(ds)):
    if len(out) >= num_prompts:
      break
    rec = ds[i]
    if 'error' in rec or not len(rec['codes']):
      continue
    meta = rec['meta']
    try:
      tags = tags_string(song_text.derive_tags(meta))
      secs = [s for s in song_text.sections(meta, frame_rate, len(rec['codes']))
              if s.start_frame < frames]
    except song_text.BadSongMetadata:
      continue
    out.append(Prompt(tags, song_text.format_lyrics(secs),
                      np.asarray(rec['melody'], np.int32)[:frames], rec['name']))
  return out


def prefs_main(config, workdir: str, out: str, num_prompts: int,
               candidates: int = DEFAULT_CANDIDATES, seconds: float = 10.0,
               metric: str = 'chroma', margin: float = DEFAULT_MARGIN,
               min_winner: float = DEFAULT_MIN_WINNER, seed: int = 0,
               split: str = 'eval', codec_workdir: str | None = None
               ) -> dict[str, Any]:
  """`musicjax prefs`: pairs from the LM in `workdir` on `split` prompts."""
  if split not in ('train', 'eval'):
    raise UserError(f"--split must be 'train' or 'eval', got {split!r}")
  if num_prompts < 1:
    raise UserError(f'--prompts must be >= 1, got {num_prompts}')
  if metric not in METRICS:
    raise UserError(f'--metric {metric!r} is unknown; known: {sorted(METRICS)}')
  if config is None:
    config = config_lib.load_saved(workdir)
  config_lib.require_task(config, workdir, song.LM_TASKS, 'prefs')
  ctx = song.SongContext(config, workdir, codec_workdir)
  frames = _frames(seconds, ctx.frame_rate)
  prompts = prompts_from_tokens(config, split, num_prompts, frames,
                                ctx.frame_rate)
  if not prompts:
    raise UserError(f'no usable {split} records in {config.data.path} to '
                    'take prompts from')
  return build_pairs(ctx, prompts, candidates=candidates, seconds=seconds,
                     metric=metric, margin=margin, min_winner=min_winner,
                     seed=seed, out_path=out)
