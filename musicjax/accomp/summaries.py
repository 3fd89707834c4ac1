"""The accompaniment model's TensorBoard summaries: an accompaniment sampled
for the first eval example's vocal.

At every eval step (and every `train.summary_every` steps), on the first
example of the first eval batch (the window at the start of the eval split's
first song, tags and reference kept):

  * the first `summary.seconds` of its window (at most `data.max_frames`
    frames) are accompanied with `config.sample`'s settings (classifier-free
    guidance included), in one jitted sampler compiled once per run;
  * through the token set's codec: `audio/accompaniment` (generated),
    `audio/reference` (the real accompaniment), `audio/mix` (the decoded vocal
    plus the generated accompaniment) and `image/spectrogram` (vocal,
    generated and reference, one above another);
  * without a codec (synthetic tokens, or a codec run that cannot be loaded):
    `image/tokens`, the vocal, generated and reference token grids; synthetic
    tokens have no frame rate, so the whole window is accompanied.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from musicjax.accomp import data as data_lib
from musicjax.accomp import sample as sample_lib
from musicjax.codec import dataset_codec as common


class AccompSummaries:
  """`AccompTask.summaries`: state is built on the first call and kept (the
  token set's facts, the codec, the jitted sampler)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._ready = False
    self._run = None
    self._vocal = common.DecodeCache()
    self._reference = common.DecodeCache()

  def _setup(self) -> None:
    c = self.config
    self.codec = None
    self.frames = int(c.data.max_frames)
    if c.data.kind != 'synthetic':
      info = data_lib.check_dataset(c)
      self.frames = max(1, min(self.frames, int(round(
          c.summary.seconds * info['frame_rate']))))
      self.codec = common.DatasetCodec(info, c.data.path)
    self.sampling = sample_lib.sampling_from_config(c.sample)
    self._ready = True

  def _sampler(self, model):
    """jit(sampler) over the model's state, traced once per run."""
    if self._run is None:
      graphdef = nnx.graphdef(model)
      s, ar = self.sampling, self.config.model.decode == 'ar'
      cfg = s.cfg_scale != 1.0

      @jax.jit
      def run(params, vocal, valid, text, ref, ref_valid, rng):
        m = nnx.merge(graphdef, params)
        yes = jnp.ones((vocal.shape[0],), bool)
        batch = {'text': text, 'ref': ref, 'ref_valid': ref_valid}
        prefix = sample_lib.prefix_of(m, batch, yes, yes)
        null = sample_lib.prefix_of(m, batch, ~yes, ~yes) if cfg else None
        if ar:
          return sample_lib.accompany_ar(m, vocal, valid, prefix, rng, s, null)
        return sample_lib.accompany(m, vocal, valid, prefix, rng, s, null)
      self._run = run
    return self._run

  def __call__(self, model, batch: Mapping[str, Any],
               rng: jax.Array) -> dict[str, Any]:
    c = self.config
    if c.summary.seconds <= 0:
      return {}
    if not self._ready:
      self._setup()
    ex = common.first_example(batch)
    t = self.frames
    vocal, valid = ex['vocal'][:, :t], ex['valid'][:, :t]
    out = self._sampler(model)(
        nnx.state(model), jnp.asarray(vocal), jnp.asarray(valid),
        jnp.asarray(ex['text']), jnp.asarray(ex['ref']),
        jnp.asarray(ex['ref_valid']), rng)
    n = int(valid[0].sum())
    grids = {'vocal': vocal[0, :n], 'generated': np.asarray(out)[0, :n],
             'reference': ex['accomp'][0, :n]}
    if self.codec is None or not self.codec.ready():
      return {common.TOKENS: common.token_image(grids, c.model.codebook_size)}
    sr = self.codec.sample_rate
    voc = self._vocal.get(self.codec, grids['vocal'])
    acc = self.codec.decode(grids['generated'])
    ref = self._reference.get(self.codec, grids['reference'])
    mix = voc + acc
    mix = mix / max(1.0, float(np.max(np.abs(mix), initial=0.0)))
    return {'audio/accompaniment': (acc, sr), 'audio/reference': (ref, sr),
            'audio/mix': (mix, sr),
            common.SPECTROGRAM: common.spectrogram_image(
                {'vocal': voc, 'generated accompaniment': acc,
                 'reference accompaniment': ref}, sr)}
