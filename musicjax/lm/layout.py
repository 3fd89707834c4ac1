"""Token ids and conventions shared by the LM's data pipeline, model and sampler.

The global sequence has one *slot* per position. Each slot carries a text
column (a text token id, or EMPTY) and K audio codes (a frame, or EMPTY), so
condition text and audio frames share one sequence (HeartMuLa §3.1-3.2):

  prefix layout       <bos> <tag>..</tag> <lyrics>..</lyrics> <ref> <audio> f0 f1 ... fN-1 END
  interleaved layout  <bos> <tag>..</tag> <ref>  [section text] <audio> frames END  [section text] <audio> frames END ...

END is an extra codebook-0 class (index = codebook_size): the prefix layout
ends the song with it; the interleaved layout ends every section with it
(Muse: one section at a time), and the song ends after the last section.

The slot that *precedes* audio frame f predicts it: the global transformer
predicts its codebook 0, the local transformer its codebooks 1..K-1. Melody
(chroma class of frame f) is added to that preceding slot's input, so it is
known exactly when frame f is being predicted, in training and in decoding.

Text ids below the tokenizer's vocabulary come from `musicjax.data.text`;
the LM appends the EXTRA tokens after them (learned null conditions for
classifier-free guidance, the reference-audio slot, the audio-start marker).

A training window's slot count (`seq_len`) follows from the config here, so
the data pipelines, the task and the benchmarks agree on it.
"""
from __future__ import annotations

import ml_collections

from musicjax.lm import patterns

EMPTY = -1                 # no text / no audio code / no melody in this slot
# Text column of the reference slot when the text vocabulary has no LM extra
# tokens (config.model.text_extra_tokens False: HeartMuLa's layout).
REF_SLOT = -2

EXTRA_TOKENS = ('<null_tags>', '<null_lyrics>', '<ref>', '<null_ref>', '<audio>',
                '<null_section>')

MELODY_CLASSES = 12        # chroma bins, 0 = C
MELODY_SILENT = 12         # frame without a melody (quiet)
MELODY_NULL = 13           # melody condition dropped (CFG) or not given
MELODY_VOCAB = 14


def extra_id(text_vocab_size: int, token: str) -> int:
  """Text-column id of an LM extra token (after the tokenizer's ids)."""
  return text_vocab_size + EXTRA_TOKENS.index(token)


def text_table_size(text_vocab_size: int) -> int:
  return text_vocab_size + len(EXTRA_TOKENS)


def end_id(codebook_size: int) -> int:
  """Codebook-0 class that ends the song (prefix) or section (interleaved)."""
  return codebook_size


def special_id(codebook_size: int) -> int:
  """Audio embedding row of an empty slot in a codebook pattern (single stream)."""
  return codebook_size + 1


def audio_table_size(codebook_size: int) -> int:
  return codebook_size + 2


def audio_steps(config: ml_collections.ConfigDict) -> int:
  """Audio slots of a window: frames, or pattern steps for single_stream
  (+1 frame for END, where the model has one)."""
  m, d = config.model, config.data
  if m.variant == 'single_stream':   # no END frame without an END class
    return patterns.num_steps(m.pattern, m.num_codebooks,
                              d.max_frames + bool(m.get('end_token', True)))
  return d.max_frames + 1


def seq_len(config: ml_collections.ConfigDict) -> int:
  """Slots of a training window: condition text, audio, and in the
  interleaved layout one END per section."""
  d = config.data
  extra = d.max_sections if d.layout == 'interleaved' else 0
  return d.max_text_tokens + audio_steps(config) + extra
