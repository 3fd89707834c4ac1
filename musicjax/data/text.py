"""The text tokenizer for LM conditions: tags, lyrics and section markers.

A byte-level BPE (HuggingFace `tokenizers`) trained on the project's own data,
never downloaded: every byte has a token, so text in any language or script
(German umlauts, Japanese, emoji) encodes and decodes back exactly, and no text
is ever mapped to an unknown token. There is no normaliser for the same reason;
text is tokenised as given.

Special tokens come first, in the fixed order of `SPECIAL_TOKENS`, so their ids
are the same in every tokenizer this module trains (`<pad>` is always 0). They
are matched before BPE, so a structure marker such as '[verse]' is one token
even in the middle of lyrics. Markers are matched case-insensitively ('[Verse]'
encodes as '[verse]', and so decodes lowercased); other bracketed words
('[hook]') are ordinary text and get BPE tokens.

The tokenizer is one JSON file, `tokenizer.json`, written by
`musicjax tokenizer` (`musicjax.prepare.tokenizer`) or by `musicjax prepare`.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, Sequence

# Grain worker processes fork after the tokenizer may have used its Rust
# thread pool, which the tokenizers library warns can deadlock the children;
# our texts are short, so its intra-call parallelism buys nothing.
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
import tokenizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from tokenizers import decoders, models, pre_tokenizers, trainers

from musicjax import fileio
from musicjax.data import song_text
from musicjax.errors import UserError

# Control tokens: padding, sequence start, and the wrappers of the condition
# parts (tags, lyrics, per-section style, section start).
CONTROL_TOKENS = ('<pad>', '<bos>', '<tag>', '</tag>', '<lyrics>', '</lyrics>',
                  '<style>', '</style>', '<section>')
# Song-structure markers, as written in lyrics (HeartMuLa §3.2).
STRUCTURE_MARKERS = ('[intro]', '[verse]', '[chorus]', '[bridge]', '[outro]',
                     '[interlude]', '[pre-chorus]', '[instrumental]', '[end]')
# Id i is SPECIAL_TOKENS[i] in every tokenizer; never reorder, only append.
SPECIAL_TOKENS = CONTROL_TOKENS + STRUCTURE_MARKERS
# Byte-level BPE starts from one token per byte value.
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE
# Vocabulary size when `config.data.text_vocab_size` is not set. Training stops
# early (with a smaller vocabulary) when the texts have no more pairs to merge.
DEFAULT_VOCAB_SIZE = 8192
TOKENIZER_FILENAME = 'tokenizer.json'

# re.ASCII: only ASCII letters fold, so e.g. the long s 'ſ' never turns into
# a marker.
_MARKER_RE = re.compile('|'.join(re.escape(m) for m in STRUCTURE_MARKERS),
                        re.IGNORECASE | re.ASCII)


class TokenizerFileError(UserError, ValueError):
  """A tokenizer file that is missing, unreadable or not one of ours."""


class VocabSizeError(UserError, ValueError):
  """A vocabulary too small for the special tokens plus the byte alphabet."""


def _how_to_build(path: str) -> str:
  return (f'build one with `musicjax tokenizer --config CONFIG --out {path}` '
          '(`musicjax prepare --codec-workdir CODEC_WORKDIR --out DIR` also '
          f'writes one, DIR/{TOKENIZER_FILENAME})')


def resolve_path(path: str) -> str:
  """`path` itself, or DIR/tokenizer.json when `path` is a directory."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    return os.path.join(path, TOKENIZER_FILENAME)
  return path


def canonical_markers(text: str) -> str:
  """Lowercases the known structure markers in `text` ('[Verse]' -> '[verse]')."""
  return _MARKER_RE.sub(lambda m: m.group(0).lower(), text)


class TextTokenizer:
  """Byte-level BPE with the fixed special tokens of `SPECIAL_TOKENS`."""

  def __init__(self, tokenizer, path: str | None = None):
    """Wraps a `tokenizers.Tokenizer`; use `train` or `load` instead."""
    self._tok = tokenizer
    self.path = path
    self._special_ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int,
            path: str) -> TextTokenizer:
    """Trains on `texts`, saves the result to `path` (atomically), returns it.

    Args:
      texts: training texts; special tokens in them are not split by BPE.
      vocab_size: the largest vocabulary wanted, special tokens and the 256
        byte tokens included.
      path: where to write the tokenizer JSON (a directory gets
        tokenizer.json inside it).

    Raises:
      VocabSizeError: if `vocab_size` < `MIN_VOCAB_SIZE`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
      raise VocabSizeError(
          f'vocab_size={vocab_size} is too small: the text tokenizer needs at '
          f'least {MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + '
          f'{BYTE_ALPHABET_SIZE} byte tokens); raise vocab_size')
    tok = tokenizers.Tokenizer(models.BPE())
    # add_prefix_space=False: decode(encode(x)) == x, no leading space added.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[
            tokenizers.AddedToken(t, normalized=False, special=True)
            for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator((canonical_markers(t) for t in texts), trainer)
    path = resolve_path(path)
    fileio.write_text(path, tok.to_str())
    out = cls(tok, path)
    out._check(path)
    return out

  @classmethod
  def load(cls, path: str) -> TextTokenizer:
    """Loads a tokenizer written by `train`.

    Raises:
      TokenizerFileError: if the file is missing, unreadable, or its special
        tokens are not those of `SPECIAL_TOKENS` in order.
    """
    path = resolve_path(path)
    if not os.path.isfile(path):
      raise TokenizerFileError(
          f'no text tokenizer at {path}: {_how_to_build(path)}')
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
      raise TokenizerFileError(
          f'{path} is not a readable tokenizer file ({e}); delete it and '
          f'{_how_to_build(path)}') from e
    out = cls(tok, path)
    out._check(path)
    return out

  def _check(self, path: str) -> None:
    wrong = [(t, i) for i, t in enumerate(SPECIAL_TOKENS)
             if self._tok.token_to_id(t) != i]
    if wrong:
      t, i = wrong[0]
      raise TokenizerFileError(
          f'{path} is not a musicjax text tokenizer: special token {t!r} has '
          f'id {self._tok.token_to_id(t)}, expected {i}; delete it and '
          f'{_how_to_build(path)}')

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._special_ids['<pad>']

  def special_id(self, token: str) -> int:
    """The id of one of `SPECIAL_TOKENS` ('[Verse]' is accepted for '[verse]')."""
    canonical = canonical_markers(token)
    if canonical not in self._special_ids:
      raise ValueError(f'{token!r} is not a special token; expected one of '
                       f'{SPECIAL_TOKENS}')
    return self._special_ids[canonical]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no <bos> or other tokens are added."""
    return self._tok.encode(canonical_markers(text),
                            add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens written out as their strings."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


# --------------------------------------------------------------- training data


def piece_texts(meta: dict[str, Any]) -> list[str]:
  """The condition texts of one piece: formatted tags, lyrics, section texts."""
  out = [song_text.format_tags(song_text.derive_tags(meta))]
  lyrics = meta.get('lyrics')
  if isinstance(lyrics, str):
    out.append(lyrics)
  for s in meta.get('sections') or ():
    if isinstance(s, dict):
      out.extend(v for v in (s.get('lyrics'), s.get('style'))
                 if isinstance(v, str))
  if not isinstance(lyrics, str):  # phrases repeat the lyrics; use them once
    out.extend(p['text'] for p in meta.get('phrases') or ()
               if isinstance(p, dict) and isinstance(p.get('text'), str))
  return [t for t in out if t]
