"""Host-side (numpy) construction of slot sequences in the layouts of layout.py.

A *part* is either condition text (a list of text ids) or audio (codes [T, K]
with melody classes [T] and whether an END frame follows). Both layouts are a
list of parts:

  prefix:       [text: bos tags lyrics <ref> <audio>] [audio: frames, END]
  interleaved:  [text: bos tags <ref>] then per section
                [text: section text <audio>] [audio: section frames, END]

`assemble(parts, seq_len)` lays them out into fixed-size arrays; the model and
the sampler only ever see these arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from musicjax.lm import layout


@dataclasses.dataclass
class TextPart:
  ids: Sequence[int]


@dataclasses.dataclass
class AudioPart:
  codes: np.ndarray              # [T, K] int
  melody: np.ndarray             # [T] melody ids (layout.MELODY_*), per frame
  end: bool                      # an END frame follows the frames
  # Melody of the frame after this part in song time (NULL: none). The slot
  # that predicts END carries it: a sampler cannot know a section ends there.
  next_melody: int = layout.MELODY_NULL


def melody_ids(chroma: np.ndarray | None, frames: int, dropped: bool) -> np.ndarray:
  """Per-frame melody ids: chroma class, SILENT for -1, NULL if dropped/absent."""
  if chroma is None or dropped:
    return np.full((frames,), layout.MELODY_NULL, np.int32)
  c = np.asarray(chroma, np.int32)[:frames]
  return np.where(c < 0, layout.MELODY_SILENT, c).astype(np.int32)


def assemble(parts: Sequence[TextPart | AudioPart], seq_len: int,
             num_codebooks: int, codebook_size: int,
             end_id: int | None = None) -> dict[str, np.ndarray]:
  """Fixed-size slot arrays; content beyond `seq_len` is cut off at the end.
  END is `end_id` (the model's, model.end_id), by default ours (codebook_size).

  Returns text [S], audio [S, K], melody [S], positions [S], valid [S].
  """
  text = np.full((seq_len,), layout.EMPTY, np.int32)
  audio = np.full((seq_len, num_codebooks), layout.EMPTY, np.int32)
  melody = np.full((seq_len,), layout.EMPTY, np.int32)
  # Melody of the frame a slot predicts is added to that slot (the slot before).
  p = 0
  for part in parts:
    if p >= seq_len:
      break
    if isinstance(part, TextPart):
      n = min(len(part.ids), seq_len - p)
      text[p:p + n] = part.ids[:n]
      p += n
      continue
    t = min(len(part.codes), seq_len - p)
    audio[p:p + t] = part.codes[:t]
    if p > 0 and t > 0:
      melody[p - 1:p - 1 + t] = part.melody[:t]
    p += t
    if part.end and p < seq_len and t == len(part.codes):
      melody[p - 1] = part.next_melody
      audio[p, 0] = layout.end_id(codebook_size) if end_id is None else end_id
      p += 1
  valid = np.zeros((seq_len,), bool)
  valid[:p] = True
  positions = np.where(valid, np.arange(seq_len), 0).astype(np.int32)
  return {'text': text, 'audio': audio, 'melody': melody,
          'positions': positions, 'valid': valid}


def left_pad(arrays: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
  """Right-aligns a prompt (batch of 1 row) in `length` slots: padding first,
  positions counted over valid slots only, so the last slot is the newest."""
  n = int(arrays['valid'].sum())
  if n > length:
    raise ValueError(f'prompt has {n} slots, more than {length}')
  out = {}
  for k, v in arrays.items():
    v = v[:n]
    fill = {'valid': False, 'positions': 0}.get(k, layout.EMPTY)
    pad = np.full((length - n,) + v.shape[1:], fill, v.dtype)
    out[k] = np.concatenate([pad, v])
  out['positions'] = np.where(out['valid'], np.cumsum(out['valid']) - 1,
                              0).astype(np.int32)
  return out
