"""Shared pieces of the token models' TensorBoard summaries (LM, accompaniment).

Tokens become audio through the codec that made the token set (dataset.json's
`codec_workdir`, at the step it tokenized with), loaded once per task on first
use, host-side, so it never enters a training step. It runs on its own mesh
and rules, whatever the model being trained uses. Where there is no codec
(synthetic tokens, or a codec run that is not there any more) the reason is
logged once and the task shows token grids instead.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from musicjax.codec import chunked
from musicjax.config import ConfigError
from musicjax.errors import UserError
from musicjax.eval import plots
from musicjax.parallel import distributed
from musicjax.train import runs

# The summaries' image names.
SPECTROGRAM = 'image/spectrogram'
TOKENS = 'image/tokens'


def say(msg: str) -> None:
  if distributed.is_primary():
    print(f'[summaries] {msg}', file=sys.stderr, flush=True)


def first_example(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Row 0 of every array of a host batch, kept 2-D ([1, ...]).

  With several processes every process gets process 0's row, so that all of
  them run the same (sharded) computation on the same inputs.
  """
  ex = {k: np.asarray(v)[:1] for k, v in batch.items()}
  if jax.process_count() == 1:
    return ex
  # Bools travel as int32 (the broadcast is a sum over processes).
  kinds = {k: v.dtype for k, v in ex.items()}
  sent = {k: v.astype(np.int32) if v.dtype == bool else v for k, v in ex.items()}
  got = multihost_utils.broadcast_one_to_all(sent)
  return {k: np.asarray(v).astype(kinds[k]) for k, v in got.items()}


class DatasetCodec:
  """The codec of a prepared token set (its dataset.json), loaded on first use.

  `ready()` loads it once; if it cannot be loaded it says why, once, and stays
  unavailable for the rest of the run (no retry at every eval).
  """

  def __init__(self, info: Mapping[str, Any], data_path: str):
    self.workdir = str(info.get('codec_workdir') or '')
    self.step = info.get('codec_step')
    self.sample_rate = int(info['sample_rate'])
    self._data_path = data_path
    self._loaded = None     # a runs.Run
    self._failed = False

  def ready(self) -> bool:
    if self._loaded is None and not self._failed:
      try:
        self._loaded = self._load()
      except Exception as e:  # pylint: disable=broad-except
        self._failed = True
        say(f'no audio in the summaries, token images instead: the codec of '
            f'{self._data_path} cannot be loaded: {type(e).__name__}: {e}')
    return self._loaded is not None

  def _load(self):
    if not self.workdir or not os.path.isdir(self.workdir):
      raise UserError(f'its codec_workdir {self.workdir!r} (dataset.json) is '
                      'not there')
    load = lambda step: runs.load_run(self.workdir, step, expect='codec',
                                      flag='codec_workdir')
    step = None if self.step is None else int(self.step)
    try:  # the checkpoint that made the tokens, if it is still kept
      return load(step)
    except ConfigError:
      if step is None:
        raise
      run = load(None)
      say(f'the codec step {step} that made {self._data_path} is no longer '
          f'kept in {self.workdir}; its latest checkpoint decodes instead')
      return run

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """codes [F, K] -> mono audio [F * hop] (channels averaged)."""
    run = self._loaded
    model = run.model
    codes = np.asarray(codes, np.int32)[:, :model.num_codebooks]
    # Inside the trained model's mesh context: the codec's own one wins.
    with run.activate():
      wave = chunked.decode_array(model, codes, progress=False)
    return np.asarray(wave, np.float32).mean(axis=-1)


class DecodeCache:
  """The last decoded reference: an eval split's first example is the same at
  every eval, so its audio is decoded once."""

  def __init__(self):
    self._key = None
    self._wave = None

  def get(self, codec: DatasetCodec, codes: np.ndarray) -> np.ndarray:
    codes = np.ascontiguousarray(codes, np.int32)
    key = (codes.shape, codes.tobytes())
    if key != self._key:
      self._key, self._wave = key, codec.decode(codes)
    return self._wave


def spectrogram_image(waves: Mapping[str, np.ndarray],
                      sample_rate: int) -> np.ndarray:
  """HxWx3 uint8: the log-mel spectrograms of `waves`, one above another, on
  one time axis in seconds."""
  return plots.figure_rgb(plots.spectrogram_figure(
      waves, sample_rate, row_height=1.6, width=7.0))


def token_image(grids: Mapping[str, np.ndarray], codebook_size: int) -> np.ndarray:
  """HxWx3 uint8: token grids [frames, codebooks], one above another."""
  return plots.figure_rgb(plots.token_figure(grids, codebook_size))
