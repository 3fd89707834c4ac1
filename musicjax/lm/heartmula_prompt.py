"""Prompts for the released HeartMuLa, built as heartlib's pipeline builds them.

A released folder (heartlib's layout):
  DIR/HeartMuLa-oss-VERSION/   the LM checkpoint (export/released/heartmula.py)
  DIR/HeartCodec-oss/          the codec checkpoint
  DIR/tokenizer.json           the text tokenizer (a `tokenizers` file)
  DIR/gen_config.json          text_bos_id, text_eos_id, audio_eos_id, empty_id

The prompt has one slot per text token, positions from 0 and no audio-start
marker: the tags (lowercased, inside <tag>..</tag>) between BOS and EOS, the
reference slot, then the lyrics (lowercased) between BOS and EOS. The
reference slot holds the reference linear of a given embedding; the released
pipeline gives a zero one. With guidance the unconditional row repeats the
tokens with 'uncond' set: the model's unconditional row replaces every text
embedding, the reference slot's too (model.AudioLM.embed).
"""
from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
import numpy as np
import tokenizers

from musicjax.errors import UserError
from musicjax.lm import layout
from musicjax.lm import model as model_lib

GEN_KEYS = ('text_bos_id', 'text_eos_id', 'audio_eos_id', 'empty_id')


class HeartMuLaFolderError(UserError):
  """A released folder that cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Paths:
  lm: str
  codec: str
  tokenizer: str
  gen_config: str


@dataclasses.dataclass(frozen=True)
class GenConfig:
  """gen_config.json. empty_id fills heartlib's masked columns; our slots
  use layout.EMPTY there, so it is read but unused."""
  text_bos_id: int
  text_eos_id: int
  audio_eos_id: int
  empty_id: int


def resolve(folder: str, version: str) -> Paths:
  """The four parts of a released folder; an error names the first missing."""
  folder = os.path.expanduser(folder)
  paths = Paths(lm=os.path.join(folder, f'HeartMuLa-oss-{version}'),
                codec=os.path.join(folder, 'HeartCodec-oss'),
                tokenizer=os.path.join(folder, 'tokenizer.json'),
                gen_config=os.path.join(folder, 'gen_config.json'))
  for what, path, ok in (
      (f'the HeartMuLa checkpoint folder (version {version!r})', paths.lm,
       os.path.isdir),
      ('the HeartCodec checkpoint folder', paths.codec, os.path.isdir),
      ('the text tokenizer', paths.tokenizer, os.path.isfile),
      ('the generation settings', paths.gen_config, os.path.isfile)):
    if not ok(path):
      raise HeartMuLaFolderError(f'{path} not found: {what} of the released '
                                 f'HeartMuLa folder {folder}')
  return paths


def read_gen_config(path: str) -> GenConfig:
  try:
    with open(path, encoding='utf-8') as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    raise HeartMuLaFolderError(f'{path}: cannot read it ({e})') from None
  missing = [k for k in GEN_KEYS if not isinstance(d.get(k), int)]
  if missing:
    raise HeartMuLaFolderError(f'{path}: no integer {", ".join(missing)}')
  return GenConfig(**{k: d[k] for k in GEN_KEYS})


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises plain Exceptions
    raise HeartMuLaFolderError(f'{path}: not a tokenizers file ({e})') from None


def check(m: ml_collections.ConfigDict, gen: GenConfig, path: str) -> None:
  """gen_config.json agrees with the model config."""
  if gen.audio_eos_id != model_lib.end_id(m):
    raise HeartMuLaFolderError(
        f'{path}: audio_eos_id {gen.audio_eos_id} is not the config\'s END '
        f'(config.model.end_id = {model_lib.end_id(m)})')
  for key in ('text_bos_id', 'text_eos_id'):
    if not 0 <= getattr(gen, key) < m.text_vocab_size:
      raise HeartMuLaFolderError(
          f'{path}: {key} {getattr(gen, key)} is outside the text vocabulary '
          f'(config.model.text_vocab_size = {m.text_vocab_size})')


def text_ids(tokenizer, text: str, gen: GenConfig, tags: bool) -> list[int]:
  """Token ids of tags or lyrics: lowercased (tags inside <tag>..</tag>),
  BOS first and EOS last unless the tokenizer already put them there."""
  text = text.lower()
  if tags:
    text = text if text.startswith('<tag>') else '<tag>' + text
    text = text if text.endswith('</tag>') else text + '</tag>'
  ids = list(tokenizer.encode(text).ids)
  if not ids or ids[0] != gen.text_bos_id:
    ids = [gen.text_bos_id] + ids
  if ids[-1] != gen.text_eos_id:
    ids = ids + [gen.text_eos_id]
  return ids


def _cut(ids: list[int], n: int, eos: int) -> list[int]:
  """At most `n` ids, the last (EOS) kept."""
  return ids if len(ids) <= n else ids[:max(n - 1, 0)] + [eos][:n]


class ReleasedText:
  """Training windows' condition text in the released prompt format (`build`):
  tags, the reference slot, lyrics; the interface of
  conditions.ConditionText.prefix, for an LM with the released text layout
  (config.model.text_extra_tokens False: no null or marker tokens). A
  dropped field is its empty text ('<tag></tag>', or no lyrics) between BOS
  and EOS, as heartlib's pipeline makes it from empty tags or lyrics."""

  def __init__(self, tokenizer_path: str, m: ml_collections.ConfigDict):
    self.gen_path = os.path.join(os.path.dirname(tokenizer_path),
                                 'gen_config.json')
    self.gen = read_gen_config(self.gen_path)
    check(m, self.gen, self.gen_path)
    self.tok = load_tokenizer(tokenizer_path)
    size = self.tok.get_vocab_size(with_added_tokens=True)
    if size > m.text_vocab_size:
      raise HeartMuLaFolderError(
          f'{tokenizer_path} has {size} ids, more than '
          f'config.model.text_vocab_size={m.text_vocab_size}: a tokenizer of '
          'another model?')
    self.ref = model_lib.ref_slot_id(m)

  def prefix(self, tags_text: str | None, lyrics_text: str | None,
             has_ref: bool, budget: int) -> list[int]:
    """tags, the reference slot (always there, as released; it carries a
    reference only where the batch gives one), lyrics: `budget` ids at most,
    each field's EOS kept."""
    del has_ref
    eos = self.gen.text_eos_id
    tags = text_ids(self.tok, tags_text or '', self.gen, True)
    lyrics = text_ids(self.tok, lyrics_text or '', self.gen, False)
    # Over budget, the tags keep at least half of it, the lyrics the rest.
    tags = _cut(tags, max(budget - 1 - len(lyrics), budget // 2), eos)
    return tags + [self.ref] + _cut(lyrics, budget - len(tags) - 1, eos)


def build(m: ml_collections.ConfigDict, tag_ids: list[int],
          lyric_ids: list[int], cfg: bool,
          ref_embed: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One prompt in generate's batch format (rows: 1, or 2 with guidance).

  Returns {'prompt': text, audio, melody, positions, valid, uncond;
  'ref_embed': [R, reference_dim] (zeros unless given), 'ref_valid': [R]},
  numpy arrays to pass to generate as prompt, ref_codes and ref_valid.
  """
  ids = list(tag_ids) + [model_lib.ref_slot_id(m)] + list(lyric_ids)
  bad = [i for i in list(tag_ids) + list(lyric_ids)
         if not 0 <= i < m.text_vocab_size]
  if bad:
    raise HeartMuLaFolderError(
        f'text ids {bad[:5]} are outside config.model.text_vocab_size = '
        f'{m.text_vocab_size}: a tokenizer of another model?')
  rows, p, k = 2 if cfg else 1, len(ids), int(m.num_codebooks)
  if ref_embed is None:
    ref_embed = np.zeros((int(m.reference_dim),), np.float32)
  prompt = {
      'text': np.tile(np.asarray(ids, np.int32), (rows, 1)),
      'audio': np.full((rows, p, k), layout.EMPTY, np.int32),
      'melody': np.full((rows, p), layout.EMPTY, np.int32),
      'positions': np.tile(np.arange(p, dtype=np.int32), (rows, 1)),
      'valid': np.ones((rows, p), bool),
      'uncond': np.arange(rows) >= 1,
  }
  return {'prompt': prompt,
          'ref_embed': np.tile(np.asarray(ref_embed, np.float32), (rows, 1)),
          'ref_valid': np.ones((rows,), bool)}


def from_files(tokenizer_path: str, gen_config_path: str,
               m: ml_collections.ConfigDict, tags: str, lyrics: str,
               cfg: bool) -> dict[str, np.ndarray]:
  """`build` from tags and lyrics text with a tokenizer.json and a
  gen_config.json (checked against the model config `m`)."""
  gen = read_gen_config(gen_config_path)
  check(m, gen, gen_config_path)
  tok = load_tokenizer(tokenizer_path)
  return build(m, text_ids(tok, tags, gen, True),
               text_ids(tok, lyrics, gen, False), cfg)


def from_folder(folder: str, version: str, m: ml_collections.ConfigDict,
                tags: str, lyrics: str, cfg: bool) -> dict[str, np.ndarray]:
  """`from_files` with a released folder's tokenizer and gen_config.json."""
  paths = resolve(folder, version)
  return from_files(paths.tokenizer, paths.gen_config, m, tags, lyrics, cfg)
