"""Grain pipeline over prepared token songs (`musicjax prepare --codec-workdir`).

    token shards (MapDataset of records)
      -> train: shuffle, repeat; eval: corpus order, repeat
      -> example (random_map in train: window, condition dropout and tag
         sampling are drawn from the element's seeded rng; eval: the
         window at the song start, every condition kept)
      -> this process's share [shard_index::shard_count]
      -> drop damaged records (reported once each by name)
      -> batch

An example is a window of at most `data.max_frames` frames of one song:
  * END follows the frames iff the window reaches the song's end;
  * tags from the metadata (`song_text.derive_tags`), each category kept with
    its `cond.tag_probs` probability;
  * lyrics of the sections that overlap the window; in the interleaved layout
    each such section's text precedes that section's frames;
  * melody: the chroma class of every frame (from the vocal stem when the
    source had one);
  * reference: a `data.reference_frames` segment of the same song that does
    not overlap the window (absent when the song is too short);
  * with a text encoder (MusicGen): the tags as a description, in the text
    encoder's tokens (`data.tokenizer`: T5's tokenizer.json), as the
    cross-attention context; dropped like the tags (no valid token); the
    sequence is the start slot and the pattern steps, no END;
  * MusicGen-Melody (model.conditioning 'prefix'): the window's chroma, from
    the song's chroma classes that `prepare --chroma` stored
    (`musicgen_chroma.window`), dropped with the melody (the null melody).
Songs longer than the window are not packed with others: every window starts
a fresh sequence; the tail of the sequence is padding.
"""
from __future__ import annotations

import os

import grain
import ml_collections
import numpy as np

from musicjax.config import ConfigError
from musicjax.data import audio
from musicjax.data import pipeline
from musicjax.data import song_text
from musicjax.data import text as text_lib
from musicjax.data import token_records
from musicjax.lm import conditions
from musicjax.lm import data as lm_data
from musicjax.lm import heartmula_prompt
from musicjax.lm import layout
from musicjax.lm import model as model_lib
from musicjax.lm import musicgen_chroma
from musicjax.lm import musicgen_song
from musicjax.lm import sequence
from musicjax.lm.data import audio_slots, local_batch


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
  return config.data.tokenizer or os.path.join(
      os.path.expanduser(config.data.path), token_records.TOKENIZER)


def load_tokenizer(config: ml_collections.ConfigDict) -> text_lib.TextTokenizer:
  tok = text_lib.TextTokenizer.load(tokenizer_path(config))
  if tok.vocab_size > config.model.text_vocab_size:
    raise ConfigError(
        f'the tokenizer {tokenizer_path(config)} has {tok.vocab_size} ids, more '
        f'than config.model.text_vocab_size={config.model.text_vocab_size}; '
        'raise model.text_vocab_size or build a smaller tokenizer')
  return tok


def released_tokenizer_path(config: ml_collections.ConfigDict) -> str:
  """The released tokenizer.json of an LM in the released text layout:
  `data.tokenizer`, else the one import-heartmula kept in the run it starts
  from (`init.workdir`). gen_config.json lies beside it."""
  from musicjax.export import import_heartmula  # pylint: disable=g-import-not-at-top
  if config.data.tokenizer:
    return os.path.expanduser(config.data.tokenizer)
  base = config.init.workdir
  path = os.path.join(os.path.expanduser(base), import_heartmula.RELEASED,
                      'tokenizer.json') if base else ''
  if not path or not os.path.isfile(path):
    raise ConfigError(
        'config.model.text_extra_tokens=False (the released HeartMuLa text '
        'layout) reads the released tokenizer.json and gen_config.json, not '
        f'{tokenizer_path(config)}: set config.data.tokenizer to the '
        'tokenizer.json of the HeartMuLa release (RUN/released/tokenizer.json '
        'of a run made by import-heartmula)' +
        (f'; {path} does not exist' if path else ''))
  return path


def condition_text(config: ml_collections.ConfigDict):
  """The condition-text builder of the model's text layout: ours
  (conditions.ConditionText, the data's tokenizer) or the released
  HeartMuLa's prompt (heartmula_prompt.ReleasedText)."""
  if config.model.text_extra_tokens:
    return conditions.ConditionText(load_tokenizer(config),
                                    config.model.text_vocab_size)
  if config.data.layout != 'prefix':
    raise ConfigError("config.model.text_extra_tokens=False (the released "
                      "HeartMuLa text layout) needs config.data.layout="
                      "'prefix'")
  return heartmula_prompt.ReleasedText(released_tokenizer_path(config),
                                       config.model)


def check_dataset(config: ml_collections.ConfigDict) -> dict:
  """dataset.json agrees with the model's codebooks."""
  info = token_records.read_dataset_info(os.path.expanduser(config.data.path))
  m = config.model
  if info['codebook_size'] != m.codebook_size:
    raise ConfigError(
        f'config.model.codebook_size={m.codebook_size} but the tokens in '
        f'{config.data.path} come from a codec with codebook size '
        f'{info["codebook_size"]}')
  if info['num_codebooks'] < m.num_codebooks:
    raise ConfigError(
        f'config.model.num_codebooks={m.num_codebooks} but the tokens in '
        f'{config.data.path} have only {info["num_codebooks"]} codebooks')
  if lm_data.has_chroma(config) and config.cond.melody:
    chroma_settings(config, info)
  return info


def chroma_settings(config: ml_collections.ConfigDict,
                    info: dict) -> musicgen_chroma.ChromaSettings:
  """The chroma settings `prepare --chroma` stored the data with; an error
  naming the fix if it did not, or with another number of classes."""
  where = os.path.join(config.data.path, token_records.DATASET_INFO)
  if not info.get('chroma'):
    raise ConfigError(
        f'{where}: the tokens have no melody chroma, which this MusicGen-Melody '
        'model reads (config.model.conditioning=prefix): prepare them again '
        'with `musicjax prepare --codec-workdir RUN/codec --chroma ...`, or '
        'train without melodies with --config.cond.melody=False')
  s = musicgen_chroma.ChromaSettings.from_dict(info['chroma'], where)
  if s.num_chroma != int(config.model.chroma_bins):
    raise ConfigError(
        f'{where}: the chroma has {s.num_chroma} classes, but '
        f'config.model.chroma_bins={config.model.chroma_bins}')
  return s


class Example:
  """Record -> slot arrays (see module docstring). Pure given (record, rng)."""

  def __init__(self, config: ml_collections.ConfigDict, frame_rate: float,
               train: bool):
    self.config = config
    self.frame_rate = frame_rate
    self.train = train
    if config.model.text_encoder:
      self.encoder_tokenizer = musicgen_song.load_tokenizer(
          tokenizer_path(config))
    else:
      self.text = condition_text(config)
    self.tag_probs = dict(config.cond.tag_probs)
    self.chroma = None   # MusicGen-Melody with melodies: the data's settings
    if lm_data.has_chroma(config) and config.cond.melody:
      self.chroma = chroma_settings(config, token_records.read_dataset_info(
          os.path.expanduser(config.data.path)))

  def unusable(self, record: dict) -> str | None:
    """Why `record` cannot give an example, or None."""
    if 'error' in record:
      return record['error']
    return 'no frames' if len(record['codes']) == 0 else None

  def _drop(self, rng: np.random.Generator, p: float, drop_all: bool) -> bool:
    if not self.train:
      return False
    return drop_all or bool(rng.random() < p)

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    c, d, cd = self.config, self.config.data, self.config.cond
    k = c.model.num_codebooks
    codes = np.asarray(record['codes'], np.int32)[:, :k]
    total = len(codes)
    w = min(d.max_frames, total)
    start = int(rng.integers(0, total - w + 1)) if self.train else 0
    stop = start + w
    reaches_end = stop == total
    drop_all = self.train and bool(rng.random() < cd.drop_all)
    # Tags (a text encoder reads them as a plain description).
    tags_text = None
    if not self._drop(rng, cd.drop_tags, drop_all):
      tags = song_text.derive_tags(record['meta'])
      if self.train:
        tags = song_text.sample_tags(tags, self.tag_probs, rng,
                                     extra_prob=cd.extra_tag_prob)
      fmt = (song_text.describe_tags if c.model.text_encoder else
             song_text.format_tags)
      tags_text = fmt(tags) or None
    # Melody.
    drop_melody = (not cd.melody) or self._drop(rng, cd.drop_melody, drop_all)
    mel = sequence.melody_ids(record.get('melody'), total, drop_melody)
    # Reference: a non-overlapping segment of the same song.
    r = d.reference_frames
    ref = np.full((max(r, 1), k), layout.EMPTY, np.int32)
    has_ref = False
    if r and not self._drop(rng, cd.drop_reference, drop_all):
      choices = [a for a in (range(0, start - r + 1)) ] + list(
          range(stop, total - r + 1))
      if choices:
        a = int(choices[int(rng.integers(len(choices)))]) if self.train else int(choices[0])
        ref = codes[a:a + r]
        has_ref = True
    if c.model.text_encoder:
      ex = sequence.assemble([audio_slots(c, codes[start:stop], mel[start:stop],
                                          False)], layout.seq_len(c), k,
                             c.model.codebook_size)
      ids = self.encoder_tokenizer.encode(tags_text or '').ids
      ex.update(lm_data.context(c, ids, keep=tags_text is not None))
      if lm_data.has_chroma(c):
        ex.update(lm_data.chroma(c, self._chroma(record, start, w, drop_melody)))
      return ex
    drop_lyrics = self._drop(rng, cd.drop_lyrics, drop_all)
    secs = [s for s in song_text.sections(record['meta'], self.frame_rate, total)
            if s.end_frame > start and s.start_frame < stop]
    budget = d.max_text_tokens
    if d.layout == 'prefix':
      lyrics = None if drop_lyrics else (song_text.format_lyrics(secs) or None)
      ids = self.text.prefix(tags_text, lyrics, has_ref, budget)
      parts = [sequence.TextPart(ids), audio_slots(
          c, codes[start:stop], mel[start:stop], reaches_end)]
    else:
      secs = secs[:d.max_sections]
      head = self.text.global_style(tags_text, has_ref, budget // 2)
      parts = [sequence.TextPart(head)]
      share = max((budget - len(head)) // max(len(secs), 1), 2)
      for s in secs:
        a, b = max(s.start_frame, start), min(s.end_frame, stop)
        txt = None if drop_lyrics else song_text.format_section(s)
        parts.append(sequence.TextPart(self.text.section(txt, share)))
        nxt = int(mel[b]) if b < total else layout.MELODY_NULL
        ends = s.end_frame <= stop
        parts.append(sequence.AudioPart(codes[a:b], mel[a:b], ends, nxt))
    ex = sequence.assemble(parts, layout.seq_len(c), k, c.model.codebook_size,
                           end_id=model_lib.end_id(c.model))
    if r:
      ex['ref_codes'] = ref.astype(np.int32)
      ex['ref_valid'] = np.asarray(has_ref)
    return ex

  def _chroma(self, record: dict, start: int, frames: int,
              dropped: bool) -> np.ndarray | None:
    """The window's chroma classes, or None (the null melody)."""
    if dropped or self.chroma is None:
      return None
    ids = record.get(token_records.CHROMA_KEY)
    if ids is None or ids.max() >= self.chroma.num_chroma:
      raise song_text.BadSongMetadata(
          'no chroma in this record, though dataset.json has chroma settings'
          if ids is None else f'chroma class {int(ids.max())} is not below '
          f'num_chroma {self.chroma.num_chroma}')
    return musicgen_chroma.window(
        ids, start / self.frame_rate, frames / self.frame_rate, self.chroma,
        int(self.config.model.chroma_length))


# The LM's and the accompaniment model's examples: an Example class with
# (config, frame_rate, train) init, `unusable(record)` and `__call__(record, rng)`.

def _safe(example, record: dict, rng) -> dict | None:
  """The example, or None with the record reported (never raises for one
  bad record: a long run goes on without it)."""
  reason = example.unusable(record)
  if reason is not None:
    audio.report_bad(record['name'], reason)
    return None
  try:
    return example(record, rng)
  except song_text.BadSongMetadata as e:
    audio.report_bad(record['name'], str(e))
    return None


class _TrainExample(grain.transforms.RandomMap):

  def __init__(self, example):
    self._example = example

  def random_map(self, record, rng: np.random.Generator):
    return _safe(self._example, record, rng)


class _EvalExample(grain.transforms.Map):

  def __init__(self, example, seed: int):
    self._example = example
    self._seed = seed

  def map(self, record):
    return _safe(self._example, record, np.random.default_rng(self._seed))


def examples_dataset(config: ml_collections.ConfigDict, ds, example_cls,
                     frame_rate: float, split: str, shard_index: int,
                     shard_count: int, what: str):
  """Records `ds` (a MapDataset) -> this process's batches of examples:
  train shuffled and randomly cropped, eval in order; unusable records
  reported and skipped, and an error naming data.path if none is usable."""
  seed = config.data.shuffle_seed
  ex = example_cls(config, frame_rate, train=split == 'train')
  if split == 'train':
    ds = ds.shuffle(seed=seed).repeat().random_map(_TrainExample(ex), seed=seed)
  else:
    ds = ds.repeat().map(_EvalExample(ex, seed))
  it = pipeline.stop_when_nothing_is_usable(
      ds[shard_index::shard_count], f'config.data.path={config.data.path!r}',
      split, what)
  return it.batch(local_batch(config, split, shard_count), drop_remainder=True)


def token_dataset(config: ml_collections.ConfigDict, split: str,
                  shard_index: int, shard_count: int):
  if config.model.variant == 'single_stream' and config.data.layout != 'prefix':
    raise ConfigError("config.data.layout='interleaved' needs the global_local "
                      'variant (single_stream supports the prefix layout)')
  info = check_dataset(config)
  path = os.path.expanduser(config.data.path)
  return examples_dataset(config, token_records.source(path, split), Example,
                          float(info['frame_rate']), split, shard_index,
                          shard_count, 'token records')
