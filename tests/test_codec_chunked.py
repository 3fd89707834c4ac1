"""`chunked.encode_array` / `decode_array`: one compiled program per codec
structure and window shape, and always the model's current weights."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from musicjax import tasks
from musicjax.codec import chunked
from tests import codec_fixtures as CF


def _codec(seed=0):
  c = CF.small_config()
  task = tasks.get(c.task)(c)
  with nnx.use_eager_sharding(False):
    return task.inference_model(task.create_state(nnx.Rngs(seed)))


def _audio(model, seconds, seed=0):
  n = int(seconds * model.hop_length * model.frame_rate)
  return 0.1 * np.random.default_rng(seed).standard_normal((n, 1)).astype(np.float32)


def test_repeat_calls_compile_once():
  """Chunked calls all have one window shape; a second file, and a second
  model object of the same structure, reuse the compiled programs."""
  model = _codec()
  chunking = dict(chunk_seconds=0.5, context_seconds=0.25)
  codes = chunked.encode_array(model, _audio(model, 2.0), **chunking)
  chunked.decode_array(model, codes, progress=False, **chunking)
  enc, dec = chunked._encode._cache_size(), chunked._decode._cache_size()
  other = _codec(seed=1)
  for m, seed in ((model, 1), (other, 2)):
    codes = chunked.encode_array(m, _audio(m, 3.0, seed), **chunking)
    chunked.decode_array(m, codes, progress=False, **chunking)
  assert (chunked._encode._cache_size(), chunked._decode._cache_size()) == (
      enc, dec)


def test_weights_changed_in_place_are_used():
  """A model trained (here: perturbed) after an earlier call decodes with its
  new weights, exactly as a direct call does."""
  model = _codec()
  codes = chunked.encode_array(model, _audio(model, 0.5))
  before = chunked.decode_array(model, codes, progress=False)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p: p * 1.5, params))
  after = chunked.decode_array(model, codes, progress=False)
  assert np.max(np.abs(after - before)) > 1e-3
  direct = np.asarray(model.decode(jnp.asarray(codes)[None]))[0]
  np.testing.assert_allclose(after, direct, atol=1e-6, rtol=1e-5)
