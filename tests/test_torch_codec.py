"""musicjax_torch.Codec against the JAX codec, and the export format both ways.

Tiny random codecs (with every parameter randomised, so a wrong weight-norm
axis, tap order or padding split changes the output) are exported by
`musicjax export`'s code and loaded with musicjax_torch.from_pretrained.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import musicjax_torch
from musicjax.codec import rvq
from musicjax.codec.model import CodecModel
from musicjax.export import export as export_lib
from musicjax.export import files as files_lib
from musicjax.export import import_torch
from musicjax_torch import io as torch_io
from musicjax_torch.codec import Codec, first_argmax

from codec_fixtures import make, small_config

# Float32 parity: max |torch - jax| <= REL * max |jax| (XLA and torch sum in
# different orders; errors grow through the conv stack to ~1e-6 relative).
REL = 1e-4
# A bfloat16 export computed in bfloat16 against the float32 JAX model, as
# RMS error / RMS signal. bf16 keeps 8 mantissa bits (rounding 2^-9 = 0.2%
# per weight and activation) and these random decoders amplify it: measured
# 0.042 (0.031 from rounding the weights alone, which the float32-compute
# test below shows is all of the gap when computing in float32).
BF16_RMS_REL = 0.1
# Audio length: not a hop multiple, so encode must pad like JAX.
FRAMES, EXTRA_SAMPLES, BATCH = 6, 5, 2
# Small enough that a tiny codec's export spans several shards.
SMALL_SHARD_BYTES = 4096
STEP = 3
# Randomised parameter ranges: g and alpha stay positive and O(1) so
# activations stay O(1) through the stack.
G_RANGE, ALPHA_RANGE, BIAS_STD = (0.5, 1.5), (0.5, 2.0), 0.1

# name -> config.model overrides. `same`: the default kernels (multiples 2,
# even padding totals). `causal`: left padding, a strided conv whose kernel is
# the stride (multiple 1), transposed kernels 3x the stride, Euclidean EMA
# codebooks, stereo, no tanh. `odd`: odd strides and an even residual kernel,
# so every 'same' padding and transposed-conv trim is odd and split unevenly,
# and no output high-pass (the others have the default one). `normalized`:
# model.normalize on.
VARIANTS = {
    'same': dict(padding='same', strides=(4, 4)),
    'causal': dict(padding='causal', strides=(2, 3), down_kernel_multiple=1,
                   up_kernel_multiple=3, output_tanh=False,
                   rvq=dict(factorized=False, codebook_type='ema'),
                   channels=2),
    'odd': dict(padding='same', strides=(3, 5), residual_kernel=4,
                output_highpass_hz=0.0),
    # EnCodec-style input normalisation: codes of audio / its scale.
    'normalized': dict(padding='same', strides=(4, 4), normalize=True),
}


# ------------------------------------------------------------------ helpers
def variant_config(name: str):
  c = small_config()
  over = dict(VARIANTS[name])
  c.data.channels = over.pop('channels', 1)
  for k, v in over.pop('rvq', {}).items():
    c.model.rvq[k] = v
  for k, v in over.items():
    c.model[k] = v
  return c


def build_jax(c, seed: int) -> CodecModel:
  return make(lambda: CodecModel(c.model, c.data.sample_rate, c.data.channels,
                                 rngs=nnx.Rngs(seed)))


def randomise(model: CodecModel, seed: int) -> None:
  """Every state array random (init has g = |v| and zero biases, which would
  hide weight-norm and bias mistakes); the init flag set True."""
  rng = np.random.default_rng(seed)
  _, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)

  def draw(path, x):
    last = str(getattr(path[-1], 'key', path[-1]))
    x = np.asarray(x)
    if x.dtype == bool:
      return np.asarray(True)
    if last in ('g', 'in_g', 'out_g'):
      y = rng.uniform(*G_RANGE, x.shape)
    elif last == 'alpha':
      y = rng.uniform(*ALPHA_RANGE, x.shape)
    elif last in ('bias', 'in_b', 'out_b'):
      y = rng.normal(0.0, BIAS_STD, x.shape)
    elif last == 'cluster_size':
      y = rng.uniform(0.0, 1.0, x.shape)
    else:
      y = rng.normal(0.0, 1.0, x.shape)
    return jnp.asarray(y, x.dtype)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, pure))
  nnx.update(model, state)


def make_audio(channels: int, hop: int) -> np.ndarray:
  rng = np.random.default_rng(1)
  t = FRAMES * hop + EXTRA_SAMPLES
  return (0.5 * rng.standard_normal((BATCH, t, channels))).astype(np.float32)


def assert_close(got, want, rel: float, what: str) -> None:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
  assert err <= rel * scale, f'{what}: max error {err:.3g} > {rel} * {scale:.3g}'


def assert_rms_close(got, want, rel: float, what: str) -> None:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  err = np.sqrt(np.mean(np.square(got - want)) / np.mean(np.square(want)))
  assert err <= rel, f'{what}: relative RMS error {err:.3g} > {rel}'


def to_numpy(x: torch.Tensor) -> np.ndarray:
  return x.detach().float().numpy()


class Case:
  """A randomised JAX codec, its export and its JAX outputs."""

  def __init__(self, name: str, root) -> None:
    self.config = variant_config(name)
    self.model = build_jax(self.config, seed=0)
    randomise(self.model, seed=0)
    self.dir = str(root / name)
    export_lib.export_model(self.model, self.config, self.dir, step=STEP)
    self.audio = make_audio(self.model.audio_channels, self.model.hop_length)
    padded = self.model._pad(jnp.asarray(self.audio))  # pylint: disable=protected-access
    # np.array copies: torch.from_numpy wants writable arrays.
    self.latents = np.array(self.model.encoder(padded))
    self.codes = np.array(self.model.encode(jnp.asarray(self.audio)))
    self.decoded = np.array(self.model.decode(jnp.asarray(self.codes)))

  def export(self, dest, dtype: str = 'float32', **kw) -> str:
    export_lib.export_model(self.model, self.config, str(dest), dtype=dtype,
                            step=STEP, **kw)
    return str(dest)


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
  """Builds each variant once per module (JAX compiles dominate the time)."""
  built: dict[str, Case] = {}

  def get(name: str) -> Case:
    if name not in built:
      built[name] = Case(name, tmp_path_factory.mktemp('export'))
    return built[name]

  return get


@pytest.fixture(params=sorted(VARIANTS))
def case(request, cases):
  return cases(request.param)


@pytest.fixture
def same_case(cases):
  return cases('same')


# ------------------------------------------------------------------- parity
def test_state_dict_names_are_the_export_names(case):
  model = musicjax_torch.from_pretrained(case.dir)
  _, names = files_lib.reader(case.dir)
  assert sorted(model.state_dict()) == names


def test_latents_match_jax(case):
  model = musicjax_torch.from_pretrained(case.dir)
  with torch.no_grad():
    got = model.encode_latents(torch.from_numpy(case.audio))
  assert_close(to_numpy(got), case.latents, REL, 'latents')


def test_codes_equal_jax(case):
  model = musicjax_torch.from_pretrained(case.dir)
  with torch.no_grad():
    got = model.encode(torch.from_numpy(case.audio))
  assert got.dtype == torch.int64
  assert got.shape == (BATCH, FRAMES + 1, model.num_codebooks)
  np.testing.assert_array_equal(got.numpy(), case.codes)


def test_decode_matches_jax(case):
  model = musicjax_torch.from_pretrained(case.dir)
  with torch.no_grad():
    got = model.decode(torch.from_numpy(case.codes))
  assert got.shape == ((BATCH, (FRAMES + 1) * model.hop_length,
                        model.audio_channels))
  assert_close(to_numpy(got), case.decoded, REL, 'decoded audio')


def test_fewer_codebooks_decode_matches_jax(same_case):
  model = musicjax_torch.from_pretrained(same_case.dir)
  codes = same_case.codes[..., :1]
  with torch.no_grad():
    got = model.decode(torch.from_numpy(codes))
  want = np.asarray(same_case.model.decode(jnp.asarray(codes)))
  assert_close(to_numpy(got), want, REL, 'decoded audio from 1 codebook')


def test_ties_pick_the_first_code_like_jax():
  scores = np.array([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0],
                     [np.nan] * 4, [5.0, 1.0, 5.0, 5.0]], np.float32)
  want = np.asarray(rvq._first_argmax(jnp.asarray(scores)))  # pylint: disable=protected-access
  np.testing.assert_array_equal(first_argmax(torch.from_numpy(scores)).numpy(), want)


def test_normalized_codes_ignore_the_level_and_the_scale_restores_it(cases):
  case = cases('normalized')
  model = musicjax_torch.from_pretrained(case.dir)
  audio = torch.from_numpy(case.audio)
  with torch.no_grad():
    # x 1/8: exact in floats, so the normalised input is bit for bit the same.
    np.testing.assert_array_equal(model.encode(audio / 8).numpy(), case.codes)
    scale = model.input_scale(audio)
    got = model.decode(torch.from_numpy(case.codes), scale)
    recon, _ = model(audio)
  want_scale = np.asarray(case.model.input_scale(jnp.asarray(case.audio)))
  assert_close(to_numpy(scale), want_scale, REL, 'input scale')
  want = np.asarray(case.model.decode(jnp.asarray(case.codes),
                                      jnp.asarray(want_scale)))
  assert_close(to_numpy(got), want, REL, 'decoded audio at the input scale')
  assert_close(to_numpy(recon), want[:, :audio.shape[1]], REL, 'forward')


def test_forward_reconstructs_like_decode_of_encode(same_case):
  model = musicjax_torch.from_pretrained(same_case.dir)
  audio = torch.from_numpy(same_case.audio)
  with torch.no_grad():
    recon, codes = model(audio)
    want = model.decode(model.encode(audio))[:, :audio.shape[1]]
  np.testing.assert_array_equal(codes.numpy(), same_case.codes)
  assert_close(to_numpy(recon), to_numpy(want), REL, 'straight-through forward')


def test_bfloat16_export_decodes_close_to_float32(same_case, tmp_path):
  path = same_case.export(tmp_path / 'bf16', dtype='bfloat16')
  model = musicjax_torch.from_pretrained(path)
  assert model.dtype == torch.bfloat16
  with torch.no_grad():
    got = model.decode(torch.from_numpy(same_case.codes))
  assert got.dtype == torch.bfloat16
  assert_rms_close(to_numpy(got), same_case.decoded, BF16_RMS_REL, 'bf16 decode')


def test_bfloat16_export_in_float32_matches_jax_with_those_weights(
    same_case, tmp_path):
  """Upcast on load: the same numbers as a JAX model holding the bf16 weights."""
  path = same_case.export(tmp_path / 'bf16', dtype='bfloat16')
  model = musicjax_torch.from_pretrained(path, dtype='float32')
  jax_model = build_jax(same_case.config, seed=1)
  import_torch.load_into(jax_model, 'codec', path)
  want = np.asarray(jax_model.decode(jnp.asarray(same_case.codes)))
  with torch.no_grad():
    got = model.decode(torch.from_numpy(same_case.codes))
  assert_close(to_numpy(got), want, REL, 'bf16 weights, float32 compute')


# --------------------------------------------------------------- round trip
def state_arrays(model) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in export_lib.state_paths(model).items()}


@pytest.mark.parametrize('shard_bytes', [torch_io.DEFAULT_MAX_SHARD_BYTES,
                                         SMALL_SHARD_BYTES])
def test_round_trip_is_bit_identical(case, tmp_path, shard_bytes):
  """JAX -> export -> torch -> save_pretrained -> JAX import: same bits."""
  model = musicjax_torch.from_pretrained(case.dir)
  out = str(tmp_path / 'saved')
  written = musicjax_torch.save_pretrained(model, out, max_shard_bytes=shard_bytes)
  sharded = shard_bytes < torch_io.DEFAULT_MAX_SHARD_BYTES
  assert (torch_io.INDEX in written) == sharded
  fresh = build_jax(case.config, seed=1)
  import_torch.load_into(fresh, 'codec', out)
  want, got = state_arrays(case.model), state_arrays(fresh)
  assert want.keys() == got.keys()
  for k in want:
    assert want[k].dtype == got[k].dtype, k
    assert want[k].tobytes() == got[k].tobytes(), k


def test_saved_config_is_the_export_config(same_case, tmp_path):
  model = musicjax_torch.from_pretrained(same_case.dir)
  musicjax_torch.save_pretrained(model, str(tmp_path), dtype='bfloat16')
  with open(os.path.join(same_case.dir, 'config.json')) as f:
    before = json.load(f)
  with open(tmp_path / 'config.json') as f:
    after = json.load(f)
  assert after.pop('dtype') == 'bfloat16'
  before.pop('dtype')
  assert after == before
  assert import_torch.read_meta(str(tmp_path)) == after | {'dtype': 'bfloat16'}
  assert load_file(str(tmp_path / 'model.safetensors'))[
      'decoder.out.weight_v'].dtype == torch.bfloat16


@pytest.mark.parametrize('shard_bytes', [torch_io.DEFAULT_MAX_SHARD_BYTES,
                                         SMALL_SHARD_BYTES])
def test_saved_weights_are_readable_like_any_new_file(same_case, tmp_path,
                                                      shard_bytes):
  """safetensors alone writes 0600; a fine-tuned model saved for a teammate
  (or an import under another user) must get the umask's mode."""
  model = musicjax_torch.from_pretrained(same_case.dir)
  written = musicjax_torch.save_pretrained(model, str(tmp_path / 'out'),
                                           max_shard_bytes=shard_bytes)
  plain = tmp_path / 'plain'
  plain.write_text('')
  want = stat.S_IMODE(os.stat(plain).st_mode)
  for name in written:
    assert stat.S_IMODE(os.stat(tmp_path / 'out' / name).st_mode) == want, name


def test_save_replaces_earlier_shards(same_case, tmp_path):
  """A single-file save over a sharded one must not leave the old index (the
  readers prefer an index)."""
  model = musicjax_torch.from_pretrained(same_case.dir)
  musicjax_torch.save_pretrained(model, str(tmp_path),
                                 max_shard_bytes=SMALL_SHARD_BYTES)
  musicjax_torch.save_pretrained(model, str(tmp_path))
  weights = sorted(f for f in os.listdir(tmp_path) if 'safetensors' in f)
  assert weights == [torch_io.SINGLE]


def test_save_needs_an_export_config():
  model = Codec.from_config(_meta(small_config()))
  with pytest.raises(musicjax_torch.ExportError, match='from_pretrained'):
    musicjax_torch.save_pretrained(model, '/nonexistent')


def _meta(c) -> dict:
  return {'model': json.loads(json.dumps(c.model.to_dict())),
          'sample_rate': c.data.sample_rate, 'audio_channels': c.data.channels}


# ---------------------------------------------------------------- bad input
def _rewrite(path: str, edit) -> None:
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


MISSING = 'decoder.blocks.0.up.weight_v'
EXTRA = 'decoder.blocks.0.up.extra'
RESHAPED = 'encoder.stem.weight_g'


def damage(kind: str, path: str) -> str:
  """Breaks the export at `path`; returns what the error must name."""
  file = os.path.join(path, torch_io.SINGLE)
  if kind == 'truncated':
    with open(file, 'rb') as f:
      data = f.read()
    with open(file, 'wb') as f:
      f.write(data[:len(data) // 2])
    return file
  if kind == 'missing':
    _rewrite(file, lambda t: t.pop(MISSING))
    return MISSING
  if kind == 'extra':
    _rewrite(file, lambda t: t.update({EXTRA: torch.zeros(3)}))
    return EXTRA
  if kind == 'shape':
    _rewrite(file, lambda t: t.update(
        {RESHAPED: torch.zeros(t[RESHAPED].numel() + 1)}))
    return RESHAPED
  raise ValueError(kind)


def load_torch(path: str, config) -> None:
  del config
  musicjax_torch.from_pretrained(path)


def load_jax(path: str, config) -> None:
  import_torch.load_into(build_jax(config, seed=1), 'codec', path)


@pytest.mark.parametrize('loader', [load_torch, load_jax], ids=['torch', 'jax'])
@pytest.mark.parametrize('kind', ['truncated', 'missing', 'extra', 'shape'])
def test_damaged_export_error_names_it(same_case, tmp_path, kind, loader):
  path = str(tmp_path / 'export')
  shutil.copytree(same_case.dir, path)
  named = damage(kind, path)
  with pytest.raises(ValueError, match=re.escape(named)):
    loader(path, same_case.config)


@pytest.mark.parametrize('loader', [load_torch, load_jax], ids=['torch', 'jax'])
def test_unreadable_weights_say_how_to_fix(same_case, tmp_path, loader,
                                           monkeypatch):
  """A weights file this user may not read (an 0600 export of a teammate's)
  is named with the fix, not reported as truncated. os.access is faked: this
  machine's tests run as root, which reads any file."""
  path = str(tmp_path / 'export')
  shutil.copytree(same_case.dir, path)
  file = os.path.join(path, torch_io.SINGLE)
  access = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode, **kw: False if (
      os.fspath(p) == file and mode == os.R_OK) else access(p, mode, **kw))
  with pytest.raises(ValueError, match=re.escape(f'chmod a+r {file}')):
    loader(path, same_case.config)


@pytest.fixture
def sharded(same_case, tmp_path) -> str:
  return same_case.export(tmp_path / 'sharded', max_shard_bytes=SMALL_SHARD_BYTES)


def test_sharded_export_loads(sharded, same_case):
  assert os.path.isfile(os.path.join(sharded, torch_io.INDEX))
  model = musicjax_torch.from_pretrained(sharded)
  with torch.no_grad():
    got = model.encode(torch.from_numpy(same_case.audio))
  np.testing.assert_array_equal(got.numpy(), same_case.codes)


def test_missing_shard_is_named(sharded):
  second = f'model-00002-of-{_num_shards(sharded):05d}.safetensors'
  shard = os.path.join(sharded, second)
  os.remove(shard)
  with pytest.raises(musicjax_torch.ExportError, match=re.escape(shard)):
    musicjax_torch.from_pretrained(sharded)


def _first_shard_entry(path: str) -> tuple[str, str]:
  with open(os.path.join(path, torch_io.INDEX)) as f:
    return sorted(json.load(f)['weight_map'].items())[0]


def test_tensor_missing_from_its_shard_is_named(sharded):
  name, fname = _first_shard_entry(sharded)
  _rewrite(os.path.join(sharded, fname), lambda t: t.pop(name))
  with pytest.raises(musicjax_torch.ExportError,
                     match=f'not in the file: {re.escape(repr(name))}'):
    musicjax_torch.from_pretrained(sharded)


def test_tensor_not_in_the_index_is_named(sharded):
  _, fname = _first_shard_entry(sharded)
  _rewrite(os.path.join(sharded, fname), lambda t: t.update({EXTRA: torch.zeros(3)}))
  with pytest.raises(musicjax_torch.ExportError,
                     match=f'not listed in .*{re.escape(EXTRA)}'):
    musicjax_torch.from_pretrained(sharded)


def _num_shards(path: str) -> int:
  return sum(1 for f in os.listdir(path) if torch_io.SHARD_RE.fullmatch(f))


@pytest.mark.parametrize('edit, message', [
    (dict(format='something-else'), 'not .musicjax-export.'),
    (dict(format_version=torch_io.FORMAT_VERSION + 1), 'upgrade musicjax_torch'),
    (dict(family='vocoder'), 'unknown family'),
])
def test_bad_config_names_the_file(same_case, tmp_path, edit, message):
  path = str(tmp_path / 'export')
  shutil.copytree(same_case.dir, path)
  file = os.path.join(path, 'config.json')
  with open(file) as f:
    meta = json.load(f)
  with open(file, 'w') as f:
    json.dump(dict(meta, **edit), f)
  with pytest.raises(musicjax_torch.ExportError, match=message) as e:
    musicjax_torch.from_pretrained(path)
  assert file in str(e.value)


def test_family_without_a_torch_model_says_so(monkeypatch):
  monkeypatch.setitem(torch_io.MODELS, 'lm', ('musicjax_torch.not_there', 'X'))
  with pytest.raises(NotImplementedError, match="no 'lm' model"):
    torch_io.model_class('lm')


def test_dac_odd_stride_alignment_is_refused_by_key():
  """musicjax_torch does not build DAC's odd-padding alignment: a run that
  needs it is refused by name, one that does not (even strides) is not."""
  from musicjax_torch import codec as torch_codec
  cfg = {'strides': (2, 5), 'padding': 'same', 'decoder_dim': 8,
         'pad_extra': 'left'}
  with pytest.raises(ValueError, match='"model.pad_extra" .* odd strides'):
    torch_codec.validate_model_config(cfg)
  torch_codec.validate_model_config(dict(cfg, strides=(2, 4)))
  torch_codec.validate_model_config(dict(cfg, pad_extra='right'))
