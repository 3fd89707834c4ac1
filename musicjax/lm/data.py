"""The LM's synthetic Markov pipeline, and what every LM pipeline shares.

A synthetic example is a pure function of (seed, split, global index), so the
iterator state is a small dict saved with each checkpoint and resume is exact.
Per-process sharding takes every `shard_count`-th element.

`local_batch` and `audio_slots` serve the token pipeline
(musicjax/lm/token_data.py) and the DPO pairs too; the task picks the pipeline.
"""
from __future__ import annotations

import grain
import ml_collections
import numpy as np

from musicjax.lm import layout
from musicjax.lm import model as model_lib
from musicjax.lm import musicgen_chroma
from musicjax.lm import patterns
from musicjax.lm import sequence
from musicjax.lm import synthetic

# Synthetic songs are generated on the fly; the "dataset" is this long.
_SYNTHETIC_LENGTH = 1 << 30


def local_batch(config: ml_collections.ConfigDict, split: str, shard_count: int) -> int:
  key = 'batch_size' if split == 'train' else 'eval_batch_size'
  return config.data[key] // shard_count


def audio_slots(config: ml_collections.ConfigDict, codes: np.ndarray,
                melody: np.ndarray, end: bool) -> sequence.AudioPart:
  """Frames as the model variant sees them: frames (global_local), or pattern
  steps with an END frame appended (single_stream). Without an END class
  (MusicGen's layout) there is no END frame, and the steps follow a start
  slot whose every codebook holds the empty (pad) id, as MusicGen's decoder
  starts."""
  m = config.model
  if m.variant == 'global_local':
    return sequence.AudioPart(codes, melody, end)
  k = m.num_codebooks
  special = model_lib.empty_id(m)
  if end and m.end_token:
    end_frame = np.full((1, k), special, np.int32)
    end_frame[0, 0] = layout.end_id(m.codebook_size)
    codes = np.concatenate([codes, end_frame])
    melody = np.concatenate([melody, [layout.MELODY_NULL]])
  pat = patterns.make_pattern(m.pattern, k, len(codes))
  idx = np.maximum(pat.frame_index, 0)
  seq = np.where(pat.valid, codes[idx, np.arange(k)], special).astype(np.int32)
  # A step's melody is the melody of the frame its codebook 0 belongs to.
  mel = np.where(pat.valid[:, 0], melody[idx[:, 0]], layout.MELODY_NULL)
  if not m.end_token:
    seq = np.concatenate([np.full((1, k), special, np.int32), seq])
    mel = np.concatenate([[layout.MELODY_NULL], mel])
  return sequence.AudioPart(seq, mel.astype(np.int32), False)


def context(config: ml_collections.ConfigDict, ids, keep: bool
            ) -> dict[str, np.ndarray]:
  """A text encoder's inputs (MusicGen): 'context_tokens' and
  'context_valid' [data.max_context_tokens], the ids cut to fit (their last,
  end-of-sequence id kept) and padded; no valid slot when not `keep` (the
  condition dropped for guidance)."""
  n = int(config.data.max_context_tokens)
  ids = list(ids)
  if len(ids) > n:
    ids = ids[:n - 1] + ids[-1:]
  tokens = np.zeros((n,), np.int32)
  valid = np.zeros((n,), bool)
  if keep:
    tokens[:len(ids)] = ids
    valid[:len(ids)] = True
  return {'context_tokens': tokens, 'context_valid': valid}


def has_chroma(config: ml_collections.ConfigDict) -> bool:
  """MusicGen-Melody: the model reads a melody's chroma as its prefix."""
  return config.model.get('conditioning', 'cross') == 'prefix'


def chroma(config: ml_collections.ConfigDict, ids=None) -> dict[str, np.ndarray]:
  """MusicGen-Melody's 'chroma' [model.chroma_length, model.chroma_bins]:
  one-hots of the classes `ids` (as long as chroma_length), or of class 0
  in every frame when None, the null melody (what transformers feeds when
  there is none)."""
  m = config.model
  if ids is None:
    ids = np.zeros((int(m.chroma_length),), np.int64)
  return {'chroma': musicgen_chroma.one_hot(ids, int(m.chroma_bins))}


class _SyntheticExample(grain.transforms.Map):

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    d, m = config.data, config.model
    self._config = config
    self._spec = synthetic.MarkovSpec(
        m.codebook_size, m.num_codebooks, d.markov_branching,
        tuple(d.markov_noise), d.markov_seed)
    self._split = 0 if split == 'train' else 1
    self._start = ([] if m.text_encoder else
                   [layout.extra_id(m.text_vocab_size, '<audio>')])

  def map(self, index):
    c = self._config
    rng = np.random.default_rng([c.data.markov_seed, self._split, int(index)])
    codes = self._spec.sample(c.data.max_frames, rng)
    mel = np.full((len(codes),), layout.MELODY_NULL, np.int32)
    parts = [sequence.TextPart(self._start), audio_slots(c, codes, mel, False)]
    ex = sequence.assemble(parts, layout.seq_len(c), c.model.num_codebooks,
                           c.model.codebook_size)
    if c.model.text_encoder:   # unconditional: no text, no melody
      ex.update(context(c, [], keep=False))
    if has_chroma(c):
      ex.update(chroma(c))
    r = c.data.reference_frames
    if r:
      ex['ref_codes'] = np.full((r, c.model.num_codebooks), layout.EMPTY, np.int32)
      ex['ref_valid'] = np.zeros((), bool)
    return ex


def synthetic_dataset(config, split: str, shard_index: int, shard_count: int):
  ds = grain.MapDataset.range(_SYNTHETIC_LENGTH).map(
      _SyntheticExample(config, split))
  ds = ds[shard_index::shard_count]
  return ds.to_iter_dataset().batch(local_batch(config, split, shard_count),
                                    drop_remainder=True)
