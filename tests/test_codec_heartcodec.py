"""HeartCodec's flow-matching decoder against heartlib's own outputs.

tests/fixtures/heartcodec_tiny/ holds a tiny random HeartCodec saved by
heartlib (config.json + model.safetensors) and heartlib's outputs for each
decode stage on fixed inputs and noise (reference.npz; README.md says how
they were made). We load the folder with our loader and compare stage by
stage, then whole songs through the overlapping windows; and we check the
loader's errors on corrupted copies of the folder.

Tolerances are float32 rounding: both sides compute in float32 and differ in
summation order and library math, never in the computation. Each states the
largest error measured (jax 0.12, XLA:CPU).
"""
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from musicjax.codec.heartcodec import config as hc_config
from musicjax.codec.heartcodec import decoder, flow_matching
from musicjax.codec.heartcodec import windows
from musicjax.codec.heartcodec.ada_block import InverseRotary
from musicjax.codec.heartcodec.timestep import timestep_features
from musicjax.config import ConfigError, flatten
from musicjax.export.released import heartcodec as heartlib_weights
from musicjax.export.released import mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'heartcodec_tiny')
# Sampler noise in the fixture is int8 k / NOISE_STEPS (README.md).
NOISE_STEPS = 8


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(os.path.join(FIXTURE, 'reference.npz')))


@pytest.fixture(scope='module')
def tiny_config():
  return hc_config.load(os.path.join(ROOT, 'configs', 'codec',
                                     'heartcodec_tiny.py'))


@pytest.fixture(scope='module')
def model(tiny_config):
  return heartlib_weights.load(FIXTURE, tiny_config)


def _close(ours, theirs, atol):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  err = np.abs(ours - theirs).max()
  assert err <= atol, f'max abs error {err:.3g} > {atol:.3g}'


# ---- configs ----------------------------------------------------------------
def test_oss_config_is_heartlibs_default_model():
  """heartlib_default_config.json is HeartCodecConfig().to_dict(): the model
  heartlib builds when config.json leaves a key out (the released
  config.json itself is not in the fixture; loading it checks it against
  the config passed, see test_config_of_another_model)."""
  with open(os.path.join(FIXTURE, 'heartlib_default_config.json')) as f:
    theirs = hc_config.from_heartlib_config(json.load(f))
  oss = hc_config.load('codec/heartcodec_oss')
  assert flatten(oss) == flatten(theirs) == flatten(hc_config.default_config())
  assert hc_config.samples_per_code(oss) == 3840
  assert (oss.estimator.mlp_dim, oss.estimator.mlp_dim_2) == (4096, 8192)


def test_tiny_config_is_the_fixture_model(tiny_config):
  built = heartlib_weights.read_config(FIXTURE, tiny_config)
  assert flatten(built) == flatten(tiny_config)


def test_config_checks_name_the_key(tiny_config):
  with pytest.raises(ConfigError, match='estimator.in_channels'):
    hc_config.load('codec/heartcodec_tiny', ['estimator.in_channels=100'])
  with pytest.raises(ConfigError, match='hop_codes'):
    hc_config.load('codec/heartcodec_tiny', ['flow.hop_codes=94'])
  with pytest.raises(ConfigError, match='sample_rate'):
    hc_config.load('codec/heartcodec_tiny', ['sample_rate=48000'])
  del tiny_config


# ---- stages -----------------------------------------------------------------
def test_code_embedding(model, ref):
  codes = jnp.asarray(ref['embed_codes']).transpose(0, 2, 1)   # [B, F, K]
  # Sum of 3 codebook vectors and two linear layers: measured 4.8e-7.
  _close(model.codes(codes), ref['embed_out'], 2e-6)


def test_timestep_conditioning(model, ref):
  t = jnp.asarray(ref['time_t'])
  # Phases reach t * 1000 = 1000 rad, where float32 spacing is 6e-5; torch's
  # float32 exp is 1 ulp off in 2 of the 256 frequencies: measured 2.3e-5.
  _close(timestep_features(t, 512, 10000.0, 1000.0), ref['time_features'], 6e-5)
  for i, cond in ((1, model.estimator.time_1), (2, model.estimator.time_2)):
    mod, emb = cond(t)
    # Measured 1.9e-6 (values up to 1.6).
    _close(mod.reshape(mod.shape[0], -1), ref[f'time_mod_{i}'], 1e-5)
    _close(emb, ref[f'time_emb_{i}'], 1e-5)


def test_rotary_phases_at_the_released_head_sizes(ref):
  # The tiny model's heads (4, 8 wide) cannot tell frequency roundings apart;
  # at 64 and 128, theta^(-i/half) differs from heartlib's 1/theta^(2i/d) in
  # 10 and 19 frequencies, 4e-5 rad at position 743. Measured 6e-8 here.
  for d in (64, 128):
    pos = ref[f'rope_{d}_positions'].astype(np.float32)
    freq = np.asarray(InverseRotary(10000.0).frequencies(d // 2))
    angle = jnp.asarray(pos[:, None] * freq[None])
    _close(jnp.sin(angle), ref[f'rope_{d}_sin'], 1e-6)
    _close(jnp.cos(angle), ref[f'rope_{d}_cos'], 1e-6)


def test_estimator(model, ref):
  out = model.estimator(jnp.asarray(ref['estimator_x']),
                        jnp.asarray(ref['estimator_t']))
  # 2 + 1 modulated layers, outputs up to 1.9: measured 1.7e-6.
  _close(out, ref['estimator_out'], 1e-5)


def test_time_grid_is_torch_linspace(ref):
  np.testing.assert_array_equal(flow_matching.time_grid(10), ref['t_span'])


@pytest.mark.parametrize('name', ['cfg', 'plain'])
def test_sampler_window(model, ref, name):
  """10 Euler steps on a 20-frame window: with guidance 1.25 and a 6-frame
  in-context prefix, and without either (the estimator's plain branch)."""
  codes = jnp.asarray(ref['window_codes']).transpose(0, 2, 1)
  noise = ref[f'window_{name}_noise'][None].astype(np.float32) / NOISE_STEPS
  out = flow_matching.sample(
      model.estimator, model.codes(codes), jnp.asarray(noise),
      jnp.asarray(ref['window_prefix']),
      jnp.int32(ref[f'window_{name}_prefix_len']), num_steps=10,
      guidance_scale=float(ref[f'window_{name}_guidance']), sigma_min=1e-6)
  # Latents up to 4.9: measured 1.2e-6.
  _close(out, ref[f'window_{name}_out'], 1e-5)
  prefix = int(ref[f'window_{name}_prefix_len'])
  np.testing.assert_array_equal(np.asarray(out)[:, :prefix],
                                ref['window_prefix'][:, :prefix])


def test_scalar_decoder(model, ref):
  y = model.scalar(jnp.asarray(ref['scalar_in']).transpose(0, 2, 1))
  theirs = ref['scalar_out'][:, 0]
  # 12 convs deep, outputs up to 17: measured 4.8e-6 (3e-7 relative).
  _close(y[..., 0], theirs, 2e-6 * np.abs(theirs).max())


# ---- songs: windows --------------------------------------------------------
@pytest.mark.parametrize('length', [1, 40, 93, 94, 106, 173, 186, 300])
def test_window_plan(tiny_config, ref, length):
  """Which code frames each window reads, its in-context prefix and the
  song's sample count, as heartlib's detokenize (its sampler stubbed) did,
  for lengths through each padding branch (106 and 186: not extended, the
  last 13 codes undecoded and the song cut short, as heartlib)."""
  f = tiny_config.flow
  p = windows.plan(length, f.window_codes, f.hop_codes, f.frames_per_code,
                   tiny_config.code_rate_hz, tiny_config.sample_rate)
  frames = np.stack([p.indices[s:s + f.window_codes] for s in p.starts])
  np.testing.assert_array_equal(frames, ref[f'plan_{length}_frames'])
  prefix = [0] + [p.prefix_frames] * (len(p.starts) - 1)
  assert prefix == list(ref[f'plan_{length}_prefix'])
  spc = hc_config.samples_per_code(tiny_config)
  decoded = (f.window_codes + (len(p.starts) - 1) * f.hop_codes) * spc
  assert min(p.num_samples, decoded) == ref[f'plan_{length}_samples']


def _boundary_distance(x):
  """Distance of each value to the nearest step boundary (k + 1/2) / 9."""
  y = np.asarray(x, np.float64) * 9
  return np.abs(y - np.floor(y) - 0.5) / 9


@pytest.mark.parametrize('name', ['long', 'short'])
def test_detokenize_song(model, ref, name):
  """A whole song from fixed codes and noise: 150 codes (two windows with an
  in-context overlap and a cross-fade) and 40 (repeated to one window).

  The waveform decoder first rounds the latent to steps of 1/9, so a latent
  within float32 noise of a step boundary may round the other way in either
  implementation; such a flip is allowed only there. Without flips the
  waveform must match (with flips, test_waveform_from_heartlibs_steps still
  pins the waveform path)."""
  codes = ref[f'song_{name}_codes'].T[None]                  # [1, F, K]
  n_win = model.window_count(codes.shape[1])
  noise = ref['song_noise'][:n_win, None].astype(np.float32) / NOISE_STEPS
  audio, latents = model.detokenize(codes, noise=noise, return_latents=True)
  latents = latents[:, 0]
  # Every 8th channel stored as float32. Latents up to 4.6: measured 1.2e-6.
  tol = 1e-5
  _close(latents[..., ::8], ref[f'song_{name}_latents'], tol)
  steps = np.round(latents * 9)
  flips = steps != ref[f'song_{name}_steps']
  assert np.all(_boundary_distance(latents[flips]) < tol), 'step flip away ' \
      'from a boundary'
  assert np.all(np.abs(steps - ref[f'song_{name}_steps'])[flips] == 1)
  theirs = ref[f'song_{name}_wav']
  assert audio.shape == (1, theirs.shape[1], 2)
  if not flips.any():
    # Outputs up to 38: measured 2.1e-5 (6e-7 relative).
    _close(audio[0].T, theirs, 2e-6 * np.abs(theirs).max())


def test_batch_rows_decode_independently(model, ref):
  """heartlib decodes one song at a time; in a batch of two songs with their
  own noise each row's latents are its own (up to float32: measured 9.5e-7),
  and each row's waveform is decoded from its own latent channels."""
  codes = ref['song_long_codes'].T[None]
  noise = ref['song_noise'][:2, None].astype(np.float32) / NOISE_STEPS
  _, alone = model.detokenize(codes, noise=noise, return_latents=True)
  other = np.roll(codes, 7, axis=1)
  audio, both = model.detokenize(
      np.concatenate([other, codes]),
      noise=np.concatenate([noise[:, :, ::-1], noise], 1), return_latents=True)
  assert audio.shape == (2, 3600, 2)
  _close(both[:, 1], alone[:, 0], 1e-5)
  assert np.abs(both[:, 0] - alone[:, 0]).max() > 1
  rows = np.asarray(model.waveform(jnp.asarray(both[0])))
  for b in range(2):
    row = np.asarray(model.waveform(jnp.asarray(both[0, b:b + 1])))
    _close(rows[b], row[0], 1e-6 * np.abs(row).max())


def test_bad_codes(model):
  with pytest.raises(ValueError, match=r'codes must be \[batch, frames, 3\]'):
    model.detokenize(np.zeros((1, 10, 8), np.int32))
  with pytest.raises(ValueError, match=r'codes must be in \[0, 16\), got 0 \.\.\. 16'):
    model.detokenize(np.arange(30).reshape(1, 10, 3) % 17)


@pytest.mark.parametrize('name', ['long', 'short'])
def test_waveform_from_heartlibs_steps(model, tiny_config, ref, name):
  """heartlib's window latents, as the steps its waveform decoder read, through
  our waveform decoder and cross-fade: its song exactly up to float32."""
  steps = ref[f'song_{name}_steps'].astype(np.float32) / 9
  waves = [np.asarray(model.waveform(jnp.asarray(s[None]))).transpose(0, 2, 1)
           for s in steps]
  f = tiny_config.flow
  overlap = (f.window_codes - f.hop_codes) * hc_config.samples_per_code(
      tiny_config)
  audio = windows.cross_fade(waves, overlap)[0]
  theirs = ref[f'song_{name}_wav']
  _close(audio[:, :theirs.shape[1]], theirs, 2e-6 * np.abs(theirs).max())


# ---- loader errors ------------------------------------------------------------
def _copy(tmp_path):
  out = tmp_path / 'heartcodec'
  shutil.copytree(FIXTURE, out)
  return out


def _rewrite(folder, edit):
  path = str(folder / 'model.safetensors')
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={'format': 'pt'})


def test_every_tensor_is_used_or_named_ignored(model):
  """The ignore list is exact: each pattern names tensors the checkpoint has,
  and loading used every other tensor (load raises on any left over)."""
  names = load_file(os.path.join(FIXTURE, 'model.safetensors'))
  for pattern in heartlib_weights.IGNORED:
    assert any(re.fullmatch(pattern, n) for n in names), pattern
  assert model is not None


def test_missing_tensor(tmp_path, tiny_config):
  folder = _copy(tmp_path)
  name = 'flow_matching.estimator.transformer_blocks.1.attn.k_proj.weight'
  _rewrite(folder, lambda t: t.pop(name))
  with pytest.raises(heartlib_weights.HeartCodecWeightsError,
                     match=rf'model\.safetensors: tensor .{name}. is missing'):
    heartlib_weights.load(str(folder), tiny_config)


def test_extra_tensor(tmp_path, tiny_config):
  folder = _copy(tmp_path)
  name = 'flow_matching.estimator.transformer_blocks.2.attn_norm.weight'
  _rewrite(folder, lambda t: t.update({name: np.ones(8, np.float32)}))
  with pytest.raises(heartlib_weights.HeartCodecWeightsError,
                     match=rf'model\.safetensors: tensors the HeartCodec '
                     rf'decoder does not have: {name}'):
    heartlib_weights.load(str(folder), tiny_config)


def test_wrong_shape(tmp_path, tiny_config):
  folder = _copy(tmp_path)
  name = 'scalar_model.decoder.1.up_conv.layer.parametrizations.weight.original1'

  def edit(t):
    t[name] = np.ascontiguousarray(t[name].transpose(1, 0, 2))
  _rewrite(folder, edit)
  with pytest.raises(heartlib_weights.HeartCodecWeightsError,
                     match=rf'tensor .{name}. has shape \(8, 16, 6\).* gives '
                     r'\(16, 8, 6\)'):
    heartlib_weights.load(str(folder), tiny_config)


def test_wrong_model_type(tmp_path):
  folder = _copy(tmp_path)
  path = folder / 'config.json'
  d = json.loads(path.read_text())
  d['model_type'] = 'heartmula'
  path.write_text(json.dumps(d))
  with pytest.raises(ConfigError, match=r"config\.json: model_type is "
                     r"'heartmula', not 'heartcodec'"):
    heartlib_weights.load(str(folder))


def test_truncated_file(tmp_path, tiny_config):
  folder = _copy(tmp_path)
  path = folder / 'model.safetensors'
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(heartlib_weights.HeartCodecWeightsError,
                     match=r'model\.safetensors: not a readable safetensors '
                     r'file .* truncated'):
    heartlib_weights.load(str(folder), tiny_config)


def test_config_of_another_model(tiny_config):
  oss = hc_config.load('codec/heartcodec_oss')
  with pytest.raises(heartlib_weights.HeartCodecWeightsError,
                     match=r'config\.json gives codes\.codebook_dim = 4, '
                     r'the config 32'):
    heartlib_weights.load(FIXTURE, oss)
  del tiny_config


def test_sharded_checkpoint_loads_the_same(tmp_path, model, tiny_config):
  """Shards plus model.safetensors.index.json (the layout save_pretrained
  writes for large models)."""
  folder = _copy(tmp_path)
  tensors = load_file(str(folder / 'model.safetensors'))
  os.remove(folder / 'model.safetensors')
  names = sorted(tensors)
  shards = [names[:len(names) // 2], names[len(names) // 2:]]
  weight_map = {}
  for i, group in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-00002.safetensors'
    save_file({n: tensors[n] for n in group}, str(folder / fname))
    weight_map.update({n: fname for n in group})
  (folder / 'model.safetensors.index.json').write_text(
      json.dumps({'metadata': {}, 'weight_map': weight_map}))
  sharded = heartlib_weights.load(str(folder), tiny_config)
  a = np.asarray(model.estimator.stack_1.layers.attn.wq[...])
  np.testing.assert_array_equal(
      np.asarray(sharded.estimator.stack_1.layers.attn.wq[...]), a)
  np.testing.assert_array_equal(np.asarray(sharded.scalar.out.v[...]),
                                np.asarray(model.scalar.out.v[...]))


def test_bfloat16_checkpoint(tmp_path, model, tiny_config):
  """A checkpoint saved in bfloat16 loads (numpy cannot read it directly)
  as its values widened to float32."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  folder = _copy(tmp_path)

  def edit(t):
    for name, x in t.items():
      if x.dtype == np.float32:
        t[name] = x.astype(ml_dtypes.bfloat16)
  _rewrite(folder, edit)
  loaded = heartlib_weights.load(str(folder), tiny_config)
  want = np.asarray(model.codes.codebooks[...]).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(loaded.codes.codebooks[...]),
                                want.astype(np.float32))


def test_released_checkpoint_layout_maps_exactly(ref):
  """The released model's tensor names and shapes (heartlib's model at its
  default config, built without values) against ours at
  configs/codec/heartcodec_oss.py: every tensor maps or is named ignored."""
  names = [str(n) for n in ref['oss_tensor_names']]
  shapes = {n: tuple(int(d) for d in s if d >= 0)
            for n, s in zip(names, ref['oss_tensor_shapes'])}
  oss = hc_config.load('codec/heartcodec_oss')
  heartlib_weights.check_layout(oss, shapes)
  # The decoder holds 1,573,081,717 of the checkpoint's 1,659,568,725
  # numbers; the rest is the encoder side and VQ statistics.
  _, state = mapping.abstract_state(
      lambda: decoder.HeartCodecDecoder(oss, rngs=nnx.Rngs(0)))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.to_pure_dict(state)))
  assert ours == 1_573_081_717
  ignored = sum(int(np.prod(s)) for n, s in shapes.items()
                if any(re.fullmatch(p, n) for p in heartlib_weights.IGNORED))
  assert ours + ignored == sum(int(np.prod(s)) for s in shapes.values())
  shapes.pop('flow_matching.estimator.transformer_blocks_2.5.mlp.up.weight')
  with pytest.raises(heartlib_weights.HeartCodecWeightsError,
                     match='transformer_blocks_2.5.mlp.up.weight. is missing'):
    heartlib_weights.check_layout(oss, shapes)


def test_one_compiled_sampler_for_every_window():
  """Windows with and without an in-context prefix, in songs of 1 and 2
  windows, run one compiled sampler program (the prefix length is traced)."""
  c = hc_config.load(os.path.join(ROOT, 'configs', 'codec',
                                  'heartcodec_tiny.py'), ['flow.num_steps=2'])
  with nnx.use_eager_sharding(False):
    fresh = decoder.HeartCodecDecoder(c, rngs=nnx.Rngs(0))  # a new program
  compiled = decoder._latent_window._cache_size  # pylint: disable=protected-access
  before = compiled()
  for length in (40, 150):
    audio = fresh.detokenize(np.zeros((1, length, 3), np.int32))
    assert audio.shape == (1, length * 24, 2) and np.isfinite(audio).all()
  assert compiled() == before + 1
