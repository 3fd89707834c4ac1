"""Synthetic paired tracks (`data.kind = 'synthetic'`) for tests and smoke runs.

Vocal codes are uniform random. The accompaniment, per `data.synthetic_task`:
  'pair'  (default): the accompaniment of frame t, codebook k is a fixed
          permutation of the vocal code at the same frame and codebook. It is
          a deterministic, frame-aligned function of the vocal: a model that
          uses the dual-track alignment can reach zero loss, one that ignores
          the vocal cannot beat log V.
  'chain': frame 0 is random and frame t, codebook k is the permutation of
          frame t - 1's code of codebook k; the vocal says nothing. A model
          learns it only by reading its neighbouring frames of the same
          track, which is what a masked model must learn from context
          (`musicjax bench accomp-context`).
Examples follow the contract of
musicjax/accomp/data.py (vocal, accomp, valid, text, ref, ref_valid); a
`synthetic_min_frames` .. max_frames random length exercises padding.
"""
from __future__ import annotations

import grain
import ml_collections
import numpy as np

from musicjax.lm.data import local_batch

PERMUTATION_SEED = 1234


def permutations(num_codebooks: int, codebook_size: int) -> np.ndarray:
  """[K, V]: accompaniment code = perm[k, vocal code]."""
  rng = np.random.default_rng(PERMUTATION_SEED)
  return np.stack([rng.permutation(codebook_size) for _ in range(num_codebooks)])


def example(config: ml_collections.ConfigDict, rng: np.random.Generator) -> dict:
  d, m = config.data, config.model
  k, v, t = m.num_codebooks, m.codebook_size, d.max_frames
  n = int(rng.integers(min(d.synthetic_min_frames, t), t + 1))
  vocal = np.full((t, k), -1, np.int32)
  vocal[:n] = rng.integers(0, v, (n, k))
  perm = permutations(k, v)
  accomp = np.full((t, k), -1, np.int32)
  if d.get('synthetic_task', 'pair') == 'chain':
    accomp[0] = rng.integers(0, v, k)
    for i in range(1, n):
      accomp[i] = perm[np.arange(k), accomp[i - 1]]
  else:
    accomp[:n] = perm[np.arange(k)[None, :], vocal[:n]]
  text = np.full((d.max_text_tokens,), -1, np.int32)
  text[:2] = rng.integers(0, m.text_vocab_size, 2)
  r = max(d.reference_frames, 1)
  ref = rng.integers(0, v, (r, k)).astype(np.int32)
  return {'vocal': vocal, 'accomp': accomp, 'valid': np.arange(t) < n,
          'text': text, 'ref': ref, 'ref_valid': np.asarray(d.reference_frames > 0)}


class _Example(grain.transforms.RandomMap):

  def __init__(self, config):
    self._config = config

  def random_map(self, index, rng: np.random.Generator):
    del index
    return example(self._config, rng)


def synthetic_dataset(config: ml_collections.ConfigDict, split: str,
                      shard_index: int, shard_count: int):
  seed = config.data.shuffle_seed + (0 if split == 'train' else 1)
  ds = grain.MapDataset.range(1 << 30).random_map(_Example(config), seed=seed)
  ds = ds[shard_index::shard_count]
  return ds.to_iter_dataset().batch(local_batch(config, split, shard_count),
                                    drop_remainder=True)
