"""EnCodec in transformers' layout (EncodecModel.save_pretrained: config.json
+ model.safetensors) <-> our codec: the same codes and audio as
transformers (non-causal with conv shortcuts as encodec_32khz's layout,
causal as encodec_24khz's), `musicjax import-encodec` -> a codec run that
encode/decode use, `export-encodec` back to a folder
EncodecModel.from_pretrained loads with the same tensors, and bad input
named. The models are tiny random EnCodecs built here (no network)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from musicjax import cli
from musicjax import config as cfg
from musicjax.config import ConfigError
from musicjax.export import import_codec
from musicjax.export.released import encodec
from musicjax.export.released import encodec_export
from musicjax.export.released import reader
from musicjax.train import new_run
from musicjax.train import runs

import released_fixtures as rf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

SR = 1200
RATIOS = (2, 3, 2)        # decoder order; hop 12, an odd stride among them
FRAMES = 30
# float32 decode of the same codes, ours vs transformers' (measured max
# 2.2e-6 at peak 2.9 non-causal, 2.5e-6 at peak 3.6 causal).
AUDIO_ATOL = 2e-5
SMALL_DISC = ['--config.disc.periods=(2,)', '--config.disc.period_channels=(4,)',
              '--config.disc.stft_fft_sizes=(128,)', '--config.disc.stft_layers=1',
              '--config.disc.stft_channels=4']


def tiny_encodec(causal=False, seed=0, **kw):
  """A random EncodecModel with every tensor drawn: weight-norm g's, biases
  and the codebook buffers too (its own init leaves codebooks at zero), so a
  mix-up in the mapping shows. 4 codebooks of 8 (1.2 kbps at 100 Hz x 3 bits)."""
  torch.manual_seed(seed)
  c = transformers.EncodecConfig(
      num_filters=4, upsampling_ratios=list(RATIOS), hidden_size=16,
      codebook_size=8, target_bandwidths=[0.6, 1.2], sampling_rate=SR,
      num_residual_layers=2, use_causal_conv=causal,
      use_conv_shortcut=not causal, **kw)
  m = transformers.EncodecModel(c).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name.endswith('bias'):
        p.copy_(0.1 * torch.randn_like(p))
      elif name.endswith('original0'):   # weight-norm g
        p.copy_(0.5 + torch.rand_like(p))
    for name, b in m.named_buffers():
      if name.endswith('codebook.embed'):
        b.copy_(0.5 * torch.randn_like(b))
      elif name.endswith('embed_avg'):
        b.copy_(torch.randn_like(b))
      elif name.endswith('cluster_size'):
        b.copy_(1 + torch.rand_like(b))
      elif name.endswith('inited'):
        b.fill_(1.0)
  return m


def audio(batch=2, length=None, seed=1):
  rng = np.random.default_rng(seed)
  t = length or int(np.prod(RATIOS)) * FRAMES
  return (0.3 * rng.normal(size=(batch, t))).astype(np.float32)


def theirs(model, x):
  """(codes [B, F, K] of all codebooks, decoded audio [B, T]) by
  transformers."""
  bw = model.config.target_bandwidths[-1]
  with torch.no_grad():
    enc = model.encode(torch.from_numpy(x)[:, None], bandwidth=bw)
    out = model.decode(enc.audio_codes, enc.audio_scales).audio_values
  return enc.audio_codes[0].numpy().transpose(0, 2, 1), out[:, 0].numpy()


def ours(model, x, codes):
  got = np.asarray(model.encode(jnp.asarray(x)[..., None]))
  out = np.asarray(model.decode(jnp.asarray(codes)))[..., 0]
  return got, out


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """(the non-causal EnCodec folder, its EncodecModel)."""
  path = str(tmp_path_factory.mktemp('encodec') / 'encodec_tiny')
  m = tiny_encodec()
  m.save_pretrained(path)
  return path, m


@pytest.fixture(scope='module')
def loaded(folder):
  return encodec.load(folder[0])


def _check_matches(m, model, x):
  codes, want = theirs(m, x)
  got_codes, got = ours(model, x, codes)
  np.testing.assert_array_equal(got_codes, codes)
  # Several codebooks in use, and audio well above the tolerance.
  assert len(np.unique(codes[..., 0])) > 2 and np.abs(want).max() > 0.5
  np.testing.assert_allclose(got, want, atol=AUDIO_ATOL, rtol=0)


def test_codes_and_audio_match_transformers(folder, loaded):
  _, m = folder
  model, c = loaded
  assert model.hop_length == m.config.hop_length and c.data.sample_rate == SR
  assert c.model.rvq.num_codebooks == m.config.num_quantizers == 4
  assert c.model.padding == 'same' and c.model.conv_shortcut
  _check_matches(m, model, audio())
  # Not a whole number of frames, and shorter than the reflect padding:
  # each conv pads the last frame as EnCodec's.
  _check_matches(m, model, audio(length=12 * FRAMES + 5))
  x = audio(length=7)
  codes, want = theirs(m, x)
  got_codes, got = ours(model, x, codes)
  np.testing.assert_array_equal(got_codes, codes)
  np.testing.assert_allclose(got, want, atol=AUDIO_ATOL, rtol=0)


def test_causal_model_matches_transformers(tmp_path):
  """encodec_24khz's layout: causal convs, identity skips."""
  m = tiny_encodec(causal=True, seed=2)
  m.save_pretrained(str(tmp_path))
  model, c = encodec.load(str(tmp_path))
  assert c.model.padding == 'causal' and not c.model.conv_shortcut
  _check_matches(m, model, audio())
  _check_matches(m, model, audio(length=12 * FRAMES + 7))


def test_old_weight_norm_names_load(folder, loaded, tmp_path):
  """Folders with torch's older weight_g / weight_v names (as on the Hub)
  load as the parametrizations ones."""
  r = reader.Reader(folder[0])
  t = {n.replace('parametrizations.weight.original0', 'weight_g')
       .replace('parametrizations.weight.original1', 'weight_v'): r.get(n)
       for n in r.names}
  assert any(n.endswith('weight_g') for n in t)
  src = rf.copy(folder[0], str(tmp_path / 'src'), tensors=t)
  model, _ = encodec.load(src)
  x = audio(batch=1)
  np.testing.assert_array_equal(
      np.asarray(model.encode(jnp.asarray(x)[..., None])),
      np.asarray(loaded[0].encode(jnp.asarray(x)[..., None])))


def test_import_encode_decode_and_export_through_the_cli(folder, loaded,
                                                         tmp_path):
  path, m = folder
  model, _ = loaded
  run = str(tmp_path / 'run')
  assert cli.main(['import-encodec', '--from', path, '--workdir', run,
                   *SMALL_DISC]) == 0
  assert not os.path.exists(new_run.staging_dir(run))
  with open(os.path.join(run, import_codec.RELEASED,
                         import_codec.record_name('encodec'))) as f:
    rec = json.load(f)
  assert rec == {'encodec': os.path.abspath(path),
                 'target_bandwidths': [0.6, 1.2]}
  saved = runs.saved_config(run, 'codec')
  assert saved.model == loaded[1].model and saved.disc.periods == (2,)

  x = audio(batch=1)[0]
  wav, npz, out = (str(tmp_path / n) for n in ('in.wav', 'c.npz', 'out.wav'))
  sf.write(wav, x, SR, subtype='FLOAT')
  assert cli.main(['encode', '--workdir', run, wav, npz]) == 0
  assert cli.main(['decode', '--workdir', run, npz, out]) == 0
  want_codes, want = ours(model, x[None], theirs(m, x[None])[0])
  np.testing.assert_array_equal(np.load(npz)['codes'], want_codes[0])
  decoded, sr = sf.read(out, dtype='float32')
  assert sr == SR
  # The file is 16-bit PCM: within half a step of the direct decode.
  np.testing.assert_allclose(decoded, np.clip(want[0], -1, 1),
                             atol=1 / 32768 + 1e-6, rtol=0)

  # Back to transformers: the same tensors, bit for bit, so the same outputs.
  back = str(tmp_path / 'back')
  assert cli.main(['export-encodec', '--workdir', run, '--out', back]) == 0
  again = transformers.EncodecModel.from_pretrained(back).eval()
  assert list(again.config.target_bandwidths) == [0.6, 1.2]
  a, b = m.state_dict(), again.state_dict()
  assert a.keys() == b.keys()
  for key in a:
    assert torch.equal(a[key], b[key]), key
  xs = audio()
  for got, want in zip(theirs(again, xs), theirs(m, xs)):
    np.testing.assert_array_equal(got, want)


def test_the_shipped_configs_are_the_released_models():
  c32 = transformers.EncodecConfig(
      target_bandwidths=[2.2], sampling_rate=32000, num_filters=64,
      upsampling_ratios=[8, 5, 4, 4], codebook_size=2048,
      use_causal_conv=False, use_conv_shortcut=False).to_dict()
  c24 = transformers.EncodecConfig().to_dict()   # its defaults: encodec_24khz
  for d, name in ((c32, 'codec/encodec_32khz'), (c24, 'codec/encodec_24khz')):
    shipped = cfg.load(name)
    encodec.run_config(d, 'config.json', shipped)   # the structure agrees
    assert encodec_export.encodec_config(shipped)['target_bandwidths'] == [
        d['target_bandwidths'][-1]]


def test_bandwidths_give_the_codebooks():
  c = cfg.load('codec/encodec_24khz')
  for k in range(1, 33):
    c.model.rvq.num_codebooks = k
    bw = encodec_export.bandwidths(c)
    d = {'sampling_rate': 24000, 'upsampling_ratios': [8, 5, 4, 2],
         'codebook_size': 1024, 'target_bandwidths': bw}
    assert encodec.num_quantizers(d) == k


def test_check_layout_needs_no_values(folder, loaded):
  shapes = reader.Reader(folder[0]).shapes()
  encodec.check_layout(loaded[1], shapes)
  del shapes['encoder.layers.13.lstm.weight_hh_l1']
  with pytest.raises(encodec.EncodecWeightsError, match='weight_hh_l1'):
    encodec.check_layout(loaded[1], shapes)


def test_only_encodecs_architecture_exports():
  with pytest.raises(ConfigError, match='config.model.activation'):
    encodec_export.encodec_config(cfg.load('codec/tiny'))


@pytest.mark.parametrize('key, value', [
    ('norm_type', 'time_group_norm'), ('chunk_length_s', 1.0),
    ('normalize', True), ('trim_right_ratio', 0.5)])
def test_the_48khz_settings_are_refused_by_key(folder, key, value):
  d, _ = encodec.read_json(folder[0])
  with pytest.raises(ConfigError, match=key):
    encodec.run_config({**d, key: value}, 'config.json')


# ---- bad input: named, and no run left behind -----------------------------------
def test_missing_tensor(folder, tmp_path, capsys):
  t = rf.tensors(folder[0])
  del t['decoder.layers.4.shortcut.conv.bias']
  src = rf.copy(folder[0], str(tmp_path / 'src'), tensors=t)
  rf.fails(capsys, 'import-encodec', src, str(tmp_path / 'run'), os.path.join(src, encodec.SINGLE),
         "'decoder.layers.4.shortcut.conv.bias'", 'missing')


def test_missing_inited_flag(folder, tmp_path, capsys):
  t = rf.tensors(folder[0])
  del t['quantizer.layers.3.codebook.inited']
  src = rf.copy(folder[0], str(tmp_path / 'src'), tensors=t)
  rf.fails(capsys, 'import-encodec', src, str(tmp_path / 'run'),
         "'quantizer.layers.3.codebook.inited'", 'missing')


def test_extra_tensor(folder, tmp_path, capsys):
  t = rf.tensors(folder[0])
  t['quantizer.layers.4.codebook.embed'] = np.zeros((8, 16), np.float32)
  src = rf.copy(folder[0], str(tmp_path / 'src'), tensors=t)
  rf.fails(capsys, 'import-encodec', src, str(tmp_path / 'run'),
         'quantizer.layers.4.codebook.embed', 'does not have')


def test_wrong_shape(folder, tmp_path, capsys):
  t = rf.tensors(folder[0])
  t['encoder.layers.13.lstm.weight_ih_l0'] = np.zeros((64, 16), np.float32)
  src = rf.copy(folder[0], str(tmp_path / 'src'), tensors=t)
  rf.fails(capsys, 'import-encodec', src, str(tmp_path / 'run'),
         "'encoder.layers.13.lstm.weight_ih_l0'", '(64, 16)', '(128, 32)')


def test_wrong_model_type(folder, tmp_path, capsys):
  src = rf.copy(folder[0], str(tmp_path / 'src'),
              config=lambda d: {**d, 'model_type': 'dac'})
  rf.fails(capsys, 'import-encodec', src, str(tmp_path / 'run'), 'config.json', "'dac'",
         "'encodec'")


def test_refused_config_key(folder, tmp_path, capsys):
  src = rf.copy(folder[0], str(tmp_path / 'src'),
              config=lambda d: {**d, 'norm_type': 'time_group_norm'})
  rf.fails(capsys, 'import-encodec', src, str(tmp_path / 'run'), 'norm_type', 'time_group_norm')


def test_truncated_file(folder, tmp_path, capsys):
  src = rf.copy(folder[0], str(tmp_path / 'src'))
  path = os.path.join(src, encodec.SINGLE)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  rf.fails(capsys, 'import-encodec', src, str(tmp_path / 'run'), path)


def test_a_config_of_another_model(folder, tmp_path, capsys):
  assert cli.main(['import-encodec', '--from', folder[0], '--workdir',
                   str(tmp_path / 'run'), '--config', 'codec/encodec_32khz']) == 2
  assert 'data.sample_rate = 1200' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'run')


def test_musicjax_torch_export_refuses_an_encodec_run(folder, tmp_path, capsys):
  """`musicjax export` (musicjax_torch's format) has no LSTM, ELU or reflect
  padding: an EnCodec run stops with one line naming the part and
  `export-encodec`, before anything is written."""
  run, out = str(tmp_path / 'run'), str(tmp_path / 'out')
  assert cli.main(['import-encodec', '--from', folder[0], '--workdir', run,
                   *SMALL_DISC]) == 0
  capsys.readouterr()
  assert cli.main(['export', '--workdir', run, '--out', out]) == 2
  err = capsys.readouterr().err.strip()
  assert 'model.lstm_layers = 2' in err and 'musicjax export-encodec' in err, err
  assert 'Traceback' not in err and len(err.splitlines()) == 1, err
  assert not os.path.exists(out)
