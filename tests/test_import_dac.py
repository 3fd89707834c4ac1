"""DAC in transformers' layout (DacModel.save_pretrained: config.json +
model.safetensors) <-> our codec: the same codes and audio as transformers,
`musicjax import-dac` -> a codec run that encode/decode use, `export-dac`
back to a folder DacModel.from_pretrained loads bit for bit, and bad input
named. The models are tiny random DACs built here (no network)."""
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from musicjax import cli
from musicjax import config as cfg
from musicjax.config import ConfigError
from musicjax.export import import_codec
from musicjax.export.released import dac
from musicjax.export.released import dac_export
from musicjax.export.released import reader
from musicjax.train import new_run
from musicjax.train import runs

import released_fixtures as rf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

SR = 16000
FRAMES = 40
# float32 decode of the same codes, ours vs transformers': both compute in
# float32, in other orders (measured max 3.5e-6 here at peak 0.67; 4.5e-5 with
# a third block at peak 1.0).
AUDIO_ATOL = 1e-4
# A small discriminator (DAC's folder has none; the run's starts fresh): less
# to compile, checkpoint and restore in the CLI test.
SMALL_DISC = ['--config.disc.periods=(2,)', '--config.disc.period_channels=(4,)',
              '--config.disc.stft_fft_sizes=(128,)', '--config.disc.stft_layers=1',
              '--config.disc.stft_channels=4']


def tiny_dac(ratios=(2, 4), seed=0):
  """A random DacModel with every tensor drawn (alphas and biases too, so
  a mix-up in the mapping shows), its output conv scaled so tanh is not
  saturated."""
  torch.manual_seed(seed)
  c = transformers.DacConfig(
      encoder_hidden_size=8, downsampling_ratios=list(ratios),
      decoder_hidden_size=32, n_codebooks=4, codebook_size=16,
      codebook_dim=4, sampling_rate=SR)
  m = transformers.DacModel(c).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name.endswith('alpha'):
        p.copy_(0.5 + torch.rand_like(p))
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn_like(p))
      elif 'codebook' in name:
        p.copy_(torch.randn_like(p))
      else:   # fan-in scaled, so the signal neither vanishes nor explodes
        fan = p.shape[0] * 2 if 'conv_t' in name else p.shape[1] * p.shape[2]
        p.copy_(torch.randn_like(p) / fan ** 0.5)
    m.decoder.conv2.weight.mul_(0.02)
  return m


def audio(model, batch=2):
  rng = np.random.default_rng(1)
  t = model.config.hop_length * FRAMES
  return (0.3 * rng.normal(size=(batch, t))).astype(np.float32)


def theirs(model, x):
  """(codes [B, F, K], decoded audio [B, T]) by transformers."""
  with torch.no_grad():
    codes = model.encode(torch.from_numpy(x)[:, None]).audio_codes
    out = model.decode(audio_codes=codes).audio_values
  return codes.numpy().transpose(0, 2, 1), out.numpy()


def ours(model, x, codes):
  got = np.asarray(model.encode(jnp.asarray(x)[..., None]))
  out = np.asarray(model.decode(jnp.asarray(codes)))[..., 0]
  return got, out


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """(the DAC folder, its DacModel)."""
  path = str(tmp_path_factory.mktemp('dac') / 'dac_tiny')
  m = tiny_dac()
  m.save_pretrained(path)
  return path, m


@pytest.fixture(scope='module')
def loaded(folder):
  return dac.load(folder[0])


def test_codes_and_audio_match_transformers(folder, loaded):
  _, m = folder
  model, c = loaded
  assert model.hop_length == m.config.hop_length and c.data.sample_rate == SR
  x = audio(m)
  codes, want = theirs(m, x)
  got_codes, got = ours(model, x, codes)
  np.testing.assert_array_equal(got_codes, codes)
  assert np.abs(want).max() < 0.9   # tanh not saturated: a real comparison
  np.testing.assert_allclose(got, want, atol=AUDIO_ATOL, rtol=0)


def test_odd_strides_match_the_original_dac(tmp_path):
  """Stride 3 pads ceil(3 / 2) = 2 on the left (model.pad_extra 'left'). Our
  decoder is descript's (output_padding = stride % 2); transformers' drops
  that sample, so its audio is one sample short at that block and differs
  only near the end."""
  m = tiny_dac(ratios=(3, 2), seed=1)
  m.save_pretrained(str(tmp_path))
  model, c = dac.load(str(tmp_path))
  assert c.model.pad_extra == 'left'
  x = audio(m)
  codes, short = theirs(m, x)
  got_codes, got = ours(model, x, codes)
  np.testing.assert_array_equal(got_codes, codes)
  assert short.shape[1] == got.shape[1] - 1
  keep = short.shape[1] - 64   # past the residual units' reach of the end
  np.testing.assert_allclose(got[:, :keep], short[:, :keep], atol=AUDIO_ATOL,
                             rtol=0)
  for block, s in zip(m.decoder.block, m.config.upsampling_ratios):
    block.conv_t1.output_padding = (s % 2,)   # descript's layer
  _, want = theirs(m, x)
  np.testing.assert_allclose(got, want, atol=AUDIO_ATOL, rtol=0)


def test_weight_norm_layouts_fold_into_the_same_model(folder, loaded, tmp_path):
  """A folder saved with torch weight norm applied (parametrizations.weight.
  original0/1) loads as the plain one."""
  path, m = folder
  wn = transformers.DacModel.from_pretrained(path).eval()
  wn.apply_weight_norm()
  wn.save_pretrained(str(tmp_path))
  names = reader.Reader(str(tmp_path)).names
  assert any('parametrizations.weight.original0' in n for n in names)
  model, _ = dac.load(str(tmp_path))
  x = audio(m, batch=1)
  want = np.asarray(loaded[0].encode(jnp.asarray(x)[..., None]))
  np.testing.assert_array_equal(
      np.asarray(model.encode(jnp.asarray(x)[..., None])), want)


def test_import_encode_decode_and_export_through_the_cli(folder, loaded,
                                                         tmp_path):
  path, m = folder
  model, _ = loaded
  run = str(tmp_path / 'run')
  assert cli.main(['import-dac', '--from', path, '--workdir', run,
                   *SMALL_DISC]) == 0
  assert not os.path.exists(new_run.staging_dir(run))
  with open(os.path.join(run, import_codec.RELEASED, import_codec.RECORD)) as f:
    assert json.load(f)['dac'] == os.path.abspath(path)
  saved = runs.saved_config(run, 'codec')
  assert saved.model == loaded[1].model and saved.disc.periods == (2,)

  x = audio(m, batch=1)[0]
  wav, npz, out = (str(tmp_path / n) for n in ('in.wav', 'c.npz', 'out.wav'))
  sf.write(wav, x, SR, subtype='FLOAT')
  assert cli.main(['encode', '--workdir', run, wav, npz]) == 0
  assert cli.main(['decode', '--workdir', run, npz, out]) == 0
  want_codes, want = ours(model, x[None], theirs(m, x[None])[0])
  np.testing.assert_array_equal(np.load(npz)['codes'], want_codes[0])
  decoded, sr = sf.read(out, dtype='float32')
  assert sr == SR
  # The file is 16-bit PCM: within half a step of the direct decode.
  np.testing.assert_allclose(decoded, np.clip(want[0], -1, 1), atol=1 / 32768 + 1e-6,
                             rtol=0)

  # Back to transformers: the same tensors, bit for bit, so the same outputs.
  back = str(tmp_path / 'back')
  assert cli.main(['export-dac', '--workdir', run, '--out', back]) == 0
  again = transformers.DacModel.from_pretrained(back).eval()
  a, b = m.state_dict(), again.state_dict()
  assert a.keys() == b.keys()
  for key in a:
    assert torch.equal(a[key], b[key]), key
  xs = audio(m)
  for got, want in zip(theirs(again, xs), theirs(m, xs)):
    np.testing.assert_array_equal(got, want)


def descript_pth(m, path):
  """DacModel `m` as descript's DAC saves it (dac.utils.download's files):
  nn.Sequential indices, weight-norm pairs, DAC(...)'s arguments."""
  n = len(m.config.downsampling_ratios)
  layer = {'snake1': 0, 'conv1': 1, 'snake2': 2, 'conv2': 3}
  rules = [
      (r'(encoder)\.conv1\.', lambda g: 'encoder.block.0.'),
      (r'encoder\.block\.(\d+)\.res_unit(\d)\.(\w+)\.',
       lambda g: f'encoder.block.{int(g[1]) + 1}.block.{int(g[2]) - 1}.block.'
       f'{layer[g[3]]}.'),
      (r'encoder\.block\.(\d+)\.(snake1|conv1)\.',
       lambda g: f'encoder.block.{int(g[1]) + 1}.block.'
       f'{3 if g[2] == "snake1" else 4}.'),
      (r'encoder\.(snake1|conv2)\.',
       lambda g: f'encoder.block.{n + 1 if g[1] == "snake1" else n + 2}.'),
      (r'(decoder)\.conv1\.', lambda g: 'decoder.model.0.'),
      (r'decoder\.block\.(\d+)\.res_unit(\d)\.(\w+)\.',
       lambda g: f'decoder.model.{int(g[1]) + 1}.block.{int(g[2]) + 1}.block.'
       f'{layer[g[3]]}.'),
      (r'decoder\.block\.(\d+)\.(snake1|conv_t1)\.',
       lambda g: f'decoder.model.{int(g[1]) + 1}.block.'
       f'{0 if g[2] == "snake1" else 1}.'),
      (r'decoder\.(snake1|conv2)\.',
       lambda g: f'decoder.model.{n + 1 if g[1] == "snake1" else n + 2}.'),
  ]
  state = {}
  for name, w in m.state_dict().items():
    for pattern, repl in rules:
      hit = re.match(pattern, name)
      if hit:
        name = repl(hit) + name[hit.end():]
        break
    if name.endswith('.weight') and 'codebook' not in name:
      # torch weight norm (dim 0): any v works; this one is 3x the weight.
      norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
      state[name[:-len('weight')] + 'weight_g'] = norm
      state[name[:-len('weight')] + 'weight_v'] = 3 * w
    else:
      state[name] = w
  rates = list(m.config.downsampling_ratios)
  kwargs = {'encoder_dim': 8, 'encoder_rates': rates, 'latent_dim': None,
            'decoder_dim': 32, 'decoder_rates': rates[::-1], 'n_codebooks': 4,
            'codebook_size': 16, 'codebook_dim': 4, 'quantizer_dropout': False,
            'sample_rate': SR}
  torch.save({'state_dict': state, 'metadata': {'kwargs': kwargs}}, path)
  return path


def test_descript_pth_files_load(folder, loaded, tmp_path):
  _, m = folder
  path = descript_pth(m, str(tmp_path / 'weights_16khz.pth'))
  model, c = dac.load(path)
  assert c.model == loaded[1].model
  x = audio(m, batch=1)
  codes, want = theirs(m, x)
  got_codes, got = ours(model, x, codes)
  np.testing.assert_array_equal(got_codes, codes)
  np.testing.assert_allclose(got, want, atol=AUDIO_ATOL, rtol=0)
  # Cut short: named, never unpickled.
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(dac.DacWeightsError, match='weights_16khz.pth'):
    dac.load(path)


def test_the_44khz_config_is_the_released_models():
  d = transformers.DacConfig(
      encoder_hidden_size=64, downsampling_ratios=[2, 4, 8, 8],
      decoder_hidden_size=1536, n_codebooks=9, codebook_size=1024,
      codebook_dim=8, sampling_rate=44100).to_dict()
  shipped = cfg.load('codec/dac_44khz')
  assert cfg.flatten(dac.run_config(d, 'config.json')) == cfg.flatten(shipped)
  assert dac_export.dac_config(shipped)['hidden_size'] == 1024


def test_check_layout_needs_no_values(folder, loaded):
  shapes = reader.Reader(folder[0]).shapes()
  dac.check_layout(loaded[1], shapes)
  del shapes['encoder.block.0.res_unit3.snake2.alpha']
  with pytest.raises(dac.DacWeightsError, match='res_unit3.snake2.alpha'):
    dac.check_layout(loaded[1], shapes)


def test_only_dacs_architecture_exports():
  with pytest.raises(ConfigError, match='config.model.dilations'):
    dac_export.dac_config(cfg.load('codec/tiny'))


# ---- bad input: named, and no run left behind -----------------------------------
def test_missing_tensor(folder, tmp_path, capsys):
  t = rf.tensors(folder[0])
  del t['decoder.block.1.res_unit2.conv1.weight']
  src = rf.copy(folder[0], str(tmp_path / 'src'), tensors=t)
  rf.fails(capsys, 'import-dac', src, str(tmp_path / 'run'), os.path.join(src, dac.SINGLE),
         "'decoder.block.1.res_unit2.conv1.weight'", 'missing')


def test_extra_tensor(folder, tmp_path, capsys):
  t = rf.tensors(folder[0])
  t['decoder.block.2.snake1.alpha'] = np.ones((1, 4, 1), np.float32)
  src = rf.copy(folder[0], str(tmp_path / 'src'), tensors=t)
  rf.fails(capsys, 'import-dac', src, str(tmp_path / 'run'), "decoder.block.2.snake1.alpha",
         'does not have')


def test_wrong_shape(folder, tmp_path, capsys):
  t = rf.tensors(folder[0])
  t['quantizer.quantizers.2.codebook.weight'] = np.zeros((32, 4), np.float32)
  src = rf.copy(folder[0], str(tmp_path / 'src'), tensors=t)
  rf.fails(capsys, 'import-dac', src, str(tmp_path / 'run'),
         "'quantizer.quantizers.2.codebook.weight'", '(32, 4)', '(16, 4)')


def test_wrong_model_type(folder, tmp_path, capsys):
  src = rf.copy(folder[0], str(tmp_path / 'src'),
              config=lambda d: {**d, 'model_type': 'encodec'})
  rf.fails(capsys, 'import-dac', src, str(tmp_path / 'run'), 'config.json', "'encodec'",
         "'dac'")


def test_unknown_config_key(folder, tmp_path, capsys):
  src = rf.copy(folder[0], str(tmp_path / 'src'),
              config=lambda d: {**d, 'use_causal_conv': True})
  rf.fails(capsys, 'import-dac', src, str(tmp_path / 'run'), 'use_causal_conv')


def test_truncated_file(folder, tmp_path, capsys):
  src = rf.copy(folder[0], str(tmp_path / 'src'))
  path = os.path.join(src, dac.SINGLE)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  rf.fails(capsys, 'import-dac', src, str(tmp_path / 'run'), path)


def test_a_config_of_another_model(folder, tmp_path, capsys):
  assert cli.main(['import-dac', '--from', folder[0], '--workdir',
                   str(tmp_path / 'run'), '--config', 'codec/dac_44khz']) == 2
  assert 'data.sample_rate = 16000' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'run')


def test_an_existing_run_is_refused(folder, tmp_path, capsys):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'notes.txt').write_text('mine')
  assert cli.main(['import-dac', '--from', folder[0], '--workdir',
                   str(run)]) == 2
  assert 'already exists and is not empty' in capsys.readouterr().err
  assert os.listdir(run) == ['notes.txt']
