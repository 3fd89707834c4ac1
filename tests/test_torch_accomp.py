"""musicjax_torch.AccompModel against the JAX accompaniment model: prefix,
logits and RTD logits; the remasking sampler (deterministic mode, and full
sampling fed JAX's own Gumbel noise) and the 'ar' decode with guidance; and
the export -> PyTorch -> import round trip.

Tiny random models (tests/test_accomp_train.py's small_config, every
parameter perturbed so that no two tensors of a kind are alike) are exported
by `musicjax export`'s code and loaded with musicjax_torch.from_pretrained.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import musicjax_torch
from musicjax.accomp import diffusion
from musicjax.accomp import model as model_lib
from musicjax.accomp import sample as sample_lib
from musicjax.export import export as export_lib
from musicjax.export import import_torch
from musicjax_torch import accomp as torch_accomp
from test_accomp_train import small_config

# Float32 parity: max |torch - jax| <= REL * max |jax| (XLA and torch sum in
# different orders).
REL = 1e-4
# A bfloat16 export computed in bfloat16 against the float32 JAX model, same
# measure; bf16 rounds weights and activations to 8 mantissa bits (2^-9).
BF16_REL = 0.05
# Parameters: sharper than the default init (so the sampler's choices are
# not near-ties) and every array multiplied by exp(PERTURB * normal), so norm
# scales differ from 1 and from each other (a swapped name would show).
EMBED_STD, INIT_STD, PERTURB = 0.5, 0.1, 0.3
CONV_KERNEL = 3
# Inputs: two rows; row 0 has a padded reference, row 1 its last frames
# invalid, a padded text and no reference.
BATCH, FRAMES, TEXT_LEN, REF_FRAMES, ROW1_FRAMES, REF0_FRAMES = 2, 12, 4, 5, 9, 3
# Sampler settings: guidance far from 1 (the null rows matter), few steps
# and frames (each step is a whole forward), a top-k / top-p that cut.
STEPS, CFG_SCALE, TEMPERATURE, TOP_K, TOP_P = 6, 3.0, 0.8, 6, 0.9
MASK_TEMPERATURE = 10.5
# Known tokens (committed from the start) in the sampler tests: frames
# [0, KNOWN_FRAMES) of row 0.
KNOWN_FRAMES = 3
# Schedule grid: sampler step counts and masked-token totals.
MAX_STEPS, MAX_TOTAL = 64, 1024
# filter_logits parity: rows of random logits rounded to TIE_QUANTUM, so that
# ties occur.
FILTER_ROWS, FILTER_VOCAB, TIE_QUANTUM = 256, 16, 0.25
VARIANTS = {'plain': {}, 'conv': {'conv_kernel': CONV_KERNEL},
            'ar_conv': {'conv_kernel': CONV_KERNEL, 'decode': 'ar'}}


@pytest.fixture(autouse=True, scope='module')
def _one_torch_thread():
  """Tiny matmuls: a second thread only contends with XLA's pool."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


# ------------------------------------------------------------------ helpers
def config(variant: str = 'plain'):
  c = small_config()
  c.model.embed_init_std = EMBED_STD
  c.model.backbone.init_std = INIT_STD
  for key, value in VARIANTS[variant].items():
    c.model[key] = value
  if c.model.decode == 'ar':
    c.loss.rtd_weight = 0.0
  return c


def perturb(model: nnx.Module, seed: int) -> nnx.Module:
  """Every float array times exp(PERTURB * normal), in place."""
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  leaves, tree = jax.tree.flatten(pure)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x * jnp.exp(PERTURB * jax.random.normal(k, x.shape, x.dtype))
            for x, k in zip(leaves, keys)]
  nnx.replace_by_pure_dict(state, jax.tree.unflatten(tree, leaves))
  nnx.update(model, state)
  return model


def make_model(c, seed: int = 0) -> model_lib.AccompModel:
  with nnx.use_eager_sharding(False):
    return perturb(model_lib.AccompModel(c.model, nnx.Rngs(seed)), seed)


def export(tmp_path, variant: str = 'plain', dtype: str = 'float32'):
  """(config, JAX model, export dir) of a tiny random accompaniment model."""
  c = config(variant)
  model = make_model(c)
  out = str(tmp_path / f'{variant}-{dtype}')
  export_lib.export_model(model, c, out, dtype=dtype)
  return c, model, out


def inputs(c, seed: int = 0) -> dict:
  """Codes with -1 reference padding (row 0), invalid tail frames, -1 text
  padding and a missing reference (row 1: ref_valid False, codes all -1)."""
  rng = np.random.default_rng(seed)
  m = c.model
  k, v = m.num_codebooks, m.codebook_size
  valid = np.ones((BATCH, FRAMES), bool)
  valid[1, ROW1_FRAMES:] = False
  text = rng.integers(0, m.text_vocab_size, (BATCH, TEXT_LEN))
  text[1, TEXT_LEN // 2:] = -1
  ref = rng.integers(0, v, (BATCH, REF_FRAMES, k))
  ref[0, REF0_FRAMES:] = -1
  ref[1] = -1
  accomp = rng.integers(0, v + 1, (BATCH, FRAMES, k))      # codes and MASK
  accomp[~valid] = model_lib.pad_id(v)
  return {'vocal': rng.integers(0, v, (BATCH, FRAMES, k)).astype(np.int32),
          'accomp': accomp.astype(np.int32), 'valid': valid,
          'text_ids': text.astype(np.int32), 'ref_codes': ref.astype(np.int32),
          'ref_valid': np.array([True, False])}


def prefix_args(x: dict, use_text: bool, use_ref: bool) -> tuple:
  """model.prefix's arguments (text valid where any id is given, as the JAX
  task's prefix_of)."""
  flags = np.ones(BATCH, bool)
  return (x['text_ids'], (x['text_ids'] >= 0).any(1), x['ref_codes'],
          x['ref_valid'], flags & use_text, flags & use_ref)


def to_torch(args):
  return [torch.as_tensor(np.asarray(a)) for a in args]


def to_jax(args):
  return [jnp.asarray(a) for a in args]


def assert_close(got, want, rel: float, what: str) -> None:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
  assert err <= rel * scale, f'{what}: max error {err:.3g} > {rel} * {scale:.3g}'


def jax_outputs(model, x: dict, use: tuple[bool, bool]) -> dict:
  p = model.prefix(*to_jax(prefix_args(x, *use)))
  h = model.hidden(*to_jax([x['vocal'], x['accomp'], x['valid']]), p)
  return {'prefix': p, 'logits': model.logits(h), 'rtd': model.rtd_logits(h)}


def torch_outputs(model, x: dict, use: tuple[bool, bool]) -> dict:
  with torch.no_grad():
    p = model.prefix(*to_torch(prefix_args(x, *use)))
    h = model.hidden(*to_torch([x['vocal'], x['accomp'], x['valid']]), p)
    return {'prefix': p, 'logits': model.logits(h), 'rtd': model.rtd_logits(h)}


# Prefix settings: both used, text dropped, reference dropped.
USES = ((True, True), (False, True), (True, False))


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_logits_and_rtd_logits_match_jax(tmp_path, variant):
  c, jax_model, path = export(tmp_path, variant)
  model = musicjax_torch.from_pretrained(path)
  assert model.causal == (c.model.decode == 'ar')
  x = inputs(c)
  for use in USES:
    want, got = jax_outputs(jax_model, x, use), torch_outputs(model, x, use)
    for key in want:
      assert got[key].dtype == torch.float32
      assert_close(got[key].numpy(), want[key], REL, f'{key} {use}')


def test_bfloat16_export_is_close(tmp_path):
  c, jax_model, path = export(tmp_path, 'conv', dtype='bfloat16')
  model = musicjax_torch.from_pretrained(path)
  assert model.text_embed.weight.dtype == torch.bfloat16
  x = inputs(c)
  want, got = jax_outputs(jax_model, x, USES[0]), torch_outputs(model, x, USES[0])
  for key in ('logits', 'rtd'):
    assert got[key].dtype == torch.float32            # heads are widened
    assert_close(got[key].numpy(), want[key], BF16_REL, key)
  # The sampler runs with bfloat16 weights too.
  codes = model.accompany(torch.as_tensor(x['vocal']), steps=STEPS,
                          cfg_scale=CFG_SCALE,
                          generator=torch.Generator().manual_seed(0))
  assert codes.min() >= 0 and codes.max() < c.model.codebook_size


# ---------------------------------------------------------- sampler pieces
def test_schedule_and_noise_scale_match_jax():
  """num_masked_after and gumbel_scale over a grid of (steps, step, total),
  compiled as in the sampler (traced step, static steps), agree: the counts
  exactly, the noise scale to float32 rounding.

  Both count as LaDA-Band's released sampler does (float64 ratio times the
  total, made float32, floored): torch in float64, JAX in exact integer
  arithmetic (tests/test_accomp_diffusion.py checks it against numpy over a
  larger grid)."""
  totals = np.arange(MAX_TOTAL + 1)
  n_masked = np.maximum(totals, 1)
  jax_sched = jax.jit(diffusion.num_masked_after, static_argnums=1)
  jax_scale = jax.jit(diffusion.gumbel_scale, static_argnums=(1, 2))
  diffs = []
  for steps in range(1, MAX_STEPS + 1):
    step = np.arange(steps)
    want = np.asarray(jax_sched(step[:, None], steps, totals[None],
                                n_masked[None]))
    got = np.stack([torch_accomp.num_masked_after(
        int(i), steps, torch.as_tensor(totals), torch.as_tensor(n_masked)).numpy()
                    for i in step])
    diffs.append((got - want).ravel())
    scales = [torch_accomp.gumbel_scale(int(i), steps, MASK_TEMPERATURE).item()
              for i in step]
    # The scale's last bit depends on how XLA fuses 1 - (step + 1) / steps
    # (one FMA at -O3, two roundings at the suite's -O0); counts must not.
    np.testing.assert_allclose(np.float32(scales),
                               jax_scale(step, steps, MASK_TEMPERATURE),
                               rtol=1e-6, atol=1e-6)
  diffs = np.concatenate(diffs)
  assert not diffs.any(), f'{np.count_nonzero(diffs)} counts differ'


@pytest.mark.parametrize('after', [True, False])
def test_token_logits_order_matches_jax(after):
  """draw's logits (top-p / top-k and temperature in either order) are JAX
  `sample.token_logits`'s: the same tokens kept, the values to float32
  rounding (XLA may divide by the temperature as a product with 1/T)."""
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(FILTER_ROWS, FILTER_VOCAB)).astype(np.float32) * 3
  s = sample_lib.Sampling(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P,
                          temperature_after_filter=after)
  want = np.asarray(sample_lib.token_logits(jnp.asarray(logits), s))
  ts = torch_accomp.Sampling(TEMPERATURE, TOP_K, TOP_P, 1.0, after)
  class Zero:                      # no token noise: only the logits matter
    def tokens(self, step, shape):
      return torch.zeros(shape)
  _, got = torch_accomp.draw(torch.as_tensor(logits), ts, Zero(), 0)
  np.testing.assert_array_equal(np.isfinite(got.numpy()), np.isfinite(want))
  np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


@pytest.mark.parametrize('top_k,top_p', [(TOP_K, 1.0), (0, TOP_P), (TOP_K, TOP_P),
                                         (2, 0.3), (0, 1.0)])
def test_filter_logits_matches_jax(top_k, top_p):
  """Same kept set, ties included (logits on a coarse grid tie often)."""
  rng = np.random.default_rng(0)
  logits = np.round(rng.normal(size=(FILTER_ROWS, FILTER_VOCAB)) / TIE_QUANTUM
                    ) * TIE_QUANTUM
  logits = logits.astype(np.float32)
  want = np.asarray(diffusion.filter_logits(jnp.asarray(logits), top_k, top_p))
  got = torch_accomp.filter_logits(torch.as_tensor(logits), top_k, top_p).numpy()
  np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ sampler
class JaxNoise:
  """The Gumbel noise JAX's samplers draw from `rng`: the diffusion step i
  splits fold_in(rng, i) into (token, mask) keys; the 'ar' frame i samples
  with fold_in(rng, i). jax.random.categorical is argmax(logits + gumbel)."""

  def __init__(self, rng, ar: bool = False):
    self.rng, self.ar = rng, ar

  def _key(self, step: int, which: int):
    key = jax.random.fold_in(self.rng, step)
    return key if self.ar else jax.random.split(key)[which]

  def _gumbel(self, key, shape) -> torch.Tensor:
    return torch.from_numpy(np.array(
        jax.random.gumbel(key, tuple(shape), jnp.float32)))

  def tokens(self, step, shape):
    return self._gumbel(self._key(step, 0), shape)

  def mask(self, step, shape):
    return self._gumbel(self._key(step, 1), shape)


class NoNoise:
  """A noise source that must not be used (deterministic mode)."""

  def tokens(self, step, shape):
    raise AssertionError('token noise drawn in deterministic mode')

  def mask(self, step, shape):
    raise AssertionError('mask noise drawn in deterministic mode')


def known_tokens(x: dict) -> np.ndarray:
  """Row 0's first frames known (any codes: the vocal's, reversed), -1
  elsewhere."""
  known = np.full(x['vocal'].shape, -1, np.int32)
  known[0, :KNOWN_FRAMES] = x['vocal'][0, :KNOWN_FRAMES][::-1]
  return known


def jax_accompany(model, x: dict, s: sample_lib.Sampling, rng, known=None,
                  ar: bool = False) -> np.ndarray:
  """The JAX sampler with guidance, prefixes built as the song runner does."""
  def run(vocal, valid, text, ref, ref_valid, known):
    yes = jnp.ones((vocal.shape[0],), bool)
    text_valid = jnp.any(text >= 0, axis=1)
    p = model.prefix(text, text_valid, ref, ref_valid, yes, yes)
    null = model.prefix(text, text_valid, ref, ref_valid, ~yes, ~yes)
    if ar:
      return sample_lib.accompany_ar(model, vocal, valid, p, rng, s, null)
    return sample_lib.accompany(model, vocal, valid, p, rng, s, null,
                                known=known)
  args = to_jax([x['vocal'], x['valid'], x['text_ids'], x['ref_codes'],
                 x['ref_valid']])
  return np.asarray(jax.jit(run)(*args, None if known is None
                                 else jnp.asarray(known)))


def torch_accompany(model, x: dict, known=None, **kw) -> np.ndarray:
  vocal, valid, text, ref, ref_valid = to_torch(
      [x['vocal'], x['valid'], x['text_ids'], x['ref_codes'], x['ref_valid']])
  return model.accompany(vocal, valid, text, ref, ref_valid,
                         known=None if known is None else torch.as_tensor(known),
                         **kw).numpy()


def assert_committed(c, x: dict, codes: np.ndarray, known=None) -> None:
  """Valid tokens are codes (known ones kept), invalid ones PAD."""
  v = c.model.codebook_size
  valid = np.broadcast_to(x['valid'][..., None], codes.shape)
  assert (codes[valid] < v).all() and (codes[valid] >= 0).all()
  assert (codes[~valid] == model_lib.pad_id(v)).all()
  if known is not None:
    np.testing.assert_array_equal(codes[known >= 0], known[known >= 0])


def test_deterministic_sampler_matches_jax(tmp_path, monkeypatch):
  """temperature 0 and mask_temperature 0, guided, with known tokens.

  JAX has no noise-free token draw (Sampling wants temperature > 0), so its
  categorical is replaced by argmax here: the JAX sampler at temperature 1
  then takes the argmax tokens and ranks them by their temperature-1
  probabilities, which is what the PyTorch deterministic mode does."""
  c, jax_model, path = export(tmp_path, 'conv')
  model = musicjax_torch.from_pretrained(path)
  x = inputs(c)
  known = known_tokens(x)
  monkeypatch.setattr(jax.random, 'categorical',
                      lambda key, logits, axis=-1: jnp.argmax(logits, axis))
  s = sample_lib.Sampling(steps=STEPS, temperature=1.0, top_k=TOP_K,
                          top_p=TOP_P, mask_temperature=0.0, cfg_scale=CFG_SCALE)
  want = jax_accompany(jax_model, x, s, jax.random.key(0), known)
  got = torch_accompany(model, x, known, steps=STEPS, temperature=0.0,
                        top_k=TOP_K, top_p=TOP_P, mask_temperature=0.0,
                        cfg_scale=CFG_SCALE, noise=NoNoise())
  assert_committed(c, x, got, known)
  np.testing.assert_array_equal(got, want)


def test_sampler_fed_jax_noise_matches_jax(tmp_path):
  """Full sampling (temperature, top-p and top-k, annealed remasking noise,
  guidance, known tokens) with JAX's Gumbel noise gives JAX's tokens."""
  c, jax_model, path = export(tmp_path, 'conv')
  model = musicjax_torch.from_pretrained(path)
  x = inputs(c)
  known = known_tokens(x)
  rng = jax.random.key(1)
  s = sample_lib.Sampling(steps=STEPS, temperature=TEMPERATURE, top_k=TOP_K,
                          top_p=TOP_P, mask_temperature=MASK_TEMPERATURE,
                          cfg_scale=CFG_SCALE)
  want = jax_accompany(jax_model, x, s, rng, known)
  got = torch_accompany(model, x, known, steps=STEPS, temperature=TEMPERATURE,
                        top_k=TOP_K, top_p=TOP_P,
                        mask_temperature=MASK_TEMPERATURE, cfg_scale=CFG_SCALE,
                        noise=JaxNoise(rng))
  assert_committed(c, x, got, known)
  np.testing.assert_array_equal(got, want)


def test_ar_decoding_fed_jax_noise_matches_jax(tmp_path):
  c, jax_model, path = export(tmp_path, 'ar_conv')
  model = musicjax_torch.from_pretrained(path)
  x = inputs(c)
  rng = jax.random.key(2)
  s = sample_lib.Sampling(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P,
                          cfg_scale=CFG_SCALE)
  want = jax_accompany(jax_model, x, s, rng, ar=True)
  got = torch_accompany(model, x, temperature=TEMPERATURE, top_k=TOP_K,
                        top_p=TOP_P, cfg_scale=CFG_SCALE,
                        noise=JaxNoise(rng, ar=True))
  assert_committed(c, x, got)
  np.testing.assert_array_equal(got, want)


def test_seeded_sampling_repeats_and_fills_every_valid_token(tmp_path):
  c, _, path = export(tmp_path, 'plain')
  model = musicjax_torch.from_pretrained(path)
  x = inputs(c)
  runs = [torch_accompany(model, x, steps=STEPS, cfg_scale=CFG_SCALE,
                          generator=torch.Generator().manual_seed(seed))
          for seed in (7, 7, 8)]
  for codes in runs:
    assert_committed(c, x, codes)
  np.testing.assert_array_equal(runs[0], runs[1])
  assert (runs[0] != runs[2]).any()


def test_from_config_refuses_other_special_ids(tmp_path):
  _, _, path = export(tmp_path, 'plain')
  meta = musicjax_torch.from_pretrained(path).export_config
  with pytest.raises(ValueError, match='mask_id'):
    torch_accomp.AccompModel.from_config(dict(meta, mask_id=meta['mask_id'] + 1))


# --------------------------------------------------------------- round trip
def test_round_trip_through_torch_is_bit_exact(tmp_path):
  c, jax_model, path = export(tmp_path, 'conv')
  model = musicjax_torch.from_pretrained(path)
  out = str(tmp_path / 'from_torch')
  musicjax_torch.save_pretrained(model, out)
  fresh = make_model(c, seed=1)
  want = export_lib.state_paths(jax_model)
  before = export_lib.state_paths(fresh)
  assert not any(np.array_equal(before[p], want[p]) for p in want)
  import_torch.load_into(fresh, 'accomp', out)
  got = export_lib.state_paths(fresh)
  assert set(got) == set(want)
  assert 'conv' in got
  for p in want:
    a, b = np.asarray(got[p]), np.asarray(want[p])
    assert a.dtype == b.dtype and a.shape == b.shape, p
    np.testing.assert_array_equal(a, b, err_msg=p)
