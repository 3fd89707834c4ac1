"""The codec's DC-free output (model.output_highpass_hz) and its training-time
gain augmentation (data.gain_augment_dbfs)."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import musicjax_torch
from musicjax import config as cfg
from musicjax.codec import chunked
from musicjax.codec.model import CodecModel
from musicjax.codec.task import default_config
from musicjax.data import augment
from musicjax.data import pipeline
from musicjax.export import export as export_lib
from musicjax.nn import dc_block as dc
from tests import audio_fixtures as afx
from tests import codec_fixtures as cf

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs', 'codec')
CUTOFF_HZ = 10.0
TOLERANCE = 1e-6
# An offset far above the untrained decoder's output (RMS ~3e-3): a bias the
# decoder could learn, set on its last conv.
BIAS = 1.0
# What of that offset may reach the output with the high-pass on: float32
# rounding of the FFT convolution (measured ~3e-7 of the offset).
LEAK = 1e-6
# First order: |H|^2 = f^2 / (f^2 + f_c^2), -0.17 dB at 5 f_c, within 0.1 dB
# from 6.6 f_c up.
FLAT_FROM_CUTOFFS, FLAT_DB = 7.0, 0.1
NEAR_FLAT_CUTOFFS, NEAR_FLAT_DB = 5.0, 0.2
GAIN_RANGE, PEAK_CAP, FLOOR = (-40.0, -10.0), -1.0, -60.0


def _model(highpass_hz: float, channels: int = 1, seed: int = 0) -> CodecModel:
  c = cf.small_config()
  c.model.output_highpass_hz = highpass_hz
  return cf.make(lambda: CodecModel(c.model, c.data.sample_rate, channels,
                                    rngs=nnx.Rngs(seed)))


def _set_out_bias(model: CodecModel, value: float) -> None:
  bias = model.decoder.out.bias
  bias[...] = jnp.full_like(bias[...], value)


def _codes(model: CodecModel, frames: int, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (2, frames, model.num_codebooks),
                            0, model.codebook_size)


# ------------------------------------------------------------ high-pass
@pytest.mark.parametrize('highpass_hz', [CUTOFF_HZ, 0.0])
def test_a_dc_offset_inside_the_decoder_never_reaches_the_output(highpass_hz):
  """The window mean of a high-passed signal is not zero (its own content
  below ~f_c over a finite window), so the test measures what the filter
  guarantees: an offset made inside the decoder (its last conv's bias) moves
  the output, and its mean over time, by less than LEAK of the offset. With
  the filter off the same offset reaches the output (through the tanh)."""
  model = _model(highpass_hz)
  codes = _codes(model, 64)
  audio = jnp.asarray(cf.tone_mix(0.128, 8000, batch=2))
  rng = jax.random.key(1)

  def outputs():
    return (np.asarray(model.decode(codes), np.float64),
            np.asarray(model(audio, rng, train=True)[0], np.float64))

  clean = outputs()
  _set_out_bias(model, BIAS)
  biased = outputs()
  for y0, y1, what in zip(clean, biased, ('decode', 'training forward')):
    shift = np.max(np.abs(y1 - y0)) / BIAS
    mean_shift = np.max(np.abs(y1.mean(axis=1) - y0.mean(axis=1))) / BIAS
    if highpass_hz:
      assert shift < LEAK and mean_shift < LEAK, (what, shift, mean_shift)
    else:  # tanh(BIAS + small): the offset is the output
      assert mean_shift > 0.5 * math.tanh(BIAS), (what, mean_shift)


@pytest.mark.parametrize('cutoff_hz,sample_rate', [
    (CUTOFF_HZ, 8000), (CUTOFF_HZ, 24000), (20.0, 48000)])
def test_fir_has_zero_dc_gain_and_a_flat_pass_band(cutoff_hz, sample_rate):
  taps = dc.dc_blocker_taps(cutoff_hz, sample_rate, TOLERANCE)
  r = math.exp(-2 * math.pi * cutoff_hz / sample_rate)
  assert taps[0] == pytest.approx(1.0, abs=1e-12)
  assert np.all(taps[1:] < 0)
  assert r ** (len(taps) - 1) >= TOLERANCE > r ** len(taps)  # cut where R^k < tol
  assert abs(math.fsum(taps)) < 1e-15
  n = 1 << (16 * len(taps)).bit_length()
  spec = np.abs(np.fft.rfft(taps, n))
  freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
  assert spec[0] < 1e-12
  db = 20 * np.log10(np.maximum(spec, 1e-30))
  assert np.max(np.abs(db[freqs >= FLAT_FROM_CUTOFFS * cutoff_hz])) < FLAT_DB
  assert np.max(np.abs(db[freqs >= NEAR_FLAT_CUTOFFS * cutoff_hz])) < NEAR_FLAT_DB
  # The truncated FIR is the ideal first-order filter wherever it matters.
  w = 2 * np.pi * freqs / sample_rate
  ideal = np.abs((1 - np.exp(-1j * w)) / (1 - r * np.exp(-1j * w)))
  above = freqs >= cutoff_hz
  np.testing.assert_allclose(spec[above], ideal[above], atol=1e-4)
  at_cutoff = np.interp(cutoff_hz, freqs, db)
  assert at_cutoff == pytest.approx(-3.0, abs=0.05)


def test_fft_convolution_is_the_causal_fir_with_the_first_sample_held():
  sr, t = 8000, 3000
  taps = dc.dc_blocker_taps(CUTOFF_HZ, sr, TOLERANCE)
  x = np.random.default_rng(0).standard_normal((2, t, 3)) + 0.7
  y = np.asarray(dc.dc_block(jnp.asarray(x, jnp.float32), CUTOFF_HZ, sr,
                             TOLERANCE), np.float64)
  held = np.concatenate([np.repeat(x[:, :1], len(taps) - 1, axis=1), x], axis=1)
  for b in range(2):
    for c in range(3):
      want = np.convolve(held[b, :, c], taps, mode='valid')
      np.testing.assert_allclose(y[b, :, c], want, atol=1e-5)
  const = np.asarray(dc.dc_block(jnp.full((1, 100, 1), 0.5), CUTOFF_HZ, sr,
                                 TOLERANCE))
  assert np.max(np.abs(const)) < LEAK   # from the first sample on


def test_new_configs_have_the_highpass_and_saved_runs_without_the_key_do_not(
    tmp_path):
  assert default_config().model.output_highpass_hz > 0
  assert default_config().data.gain_augment_dbfs
  for name in ('base.py', 'tiny.py'):   # tiny: the demo's codec
    c = cfg.load(os.path.join(CONFIGS, name))
    assert c.model.output_highpass_hz > 0 and c.data.gain_augment_dbfs
  cfg.save(c, str(tmp_path))
  path = tmp_path / 'config.json'
  raw = json.loads(path.read_text())
  for key in ('output_highpass_hz', 'output_highpass_tolerance'):
    del raw['model'][key]                  # a run saved before these existed
  for key in ('gain_augment_dbfs', 'gain_augment_peak_dbfs',
              'gain_augment_floor_dbfs'):
    del raw['data'][key]
  path.write_text(json.dumps(raw))
  old = cfg.load_saved(str(tmp_path))
  assert old.model.output_highpass_hz == 0.0
  assert not old.data.gain_augment_dbfs
  assert pipeline.gain_augment(old) is None
  model = cf.make(lambda: CodecModel(old.model, old.data.sample_rate, 1,
                                     rngs=nnx.Rngs(0)))
  assert model.decoder.highpass_hz == 0.0
  # A run saved with the keys keeps its values.
  raw['model']['output_highpass_hz'] = 15.0
  path.write_text(json.dumps(raw))
  assert cfg.load_saved(str(tmp_path)).model.output_highpass_hz == 15.0


def test_bad_highpass_settings_are_config_errors():
  c = cf.small_config()
  c.model.output_highpass_hz = -1.0
  with pytest.raises(ValueError, match='output_highpass_hz'):
    CodecModel(c.model, 8000, 1, rngs=nnx.Rngs(0))
  c.model.output_highpass_hz = 4000.0
  with pytest.raises(ValueError, match='Nyquist'):
    CodecModel(c.model, 8000, 1, rngs=nnx.Rngs(0))


def test_torch_decodes_like_jax_with_the_highpass(tmp_path):
  """With an offset on the last conv the filter carries most of the output,
  so a torch filter that differs in taps, padding or alignment fails."""
  c = cf.small_config()
  c.data.channels = 2
  model = cf.make(lambda: CodecModel(c.model, c.data.sample_rate, 2,
                                     rngs=nnx.Rngs(0)))
  _set_out_bias(model, BIAS)
  export_lib.export_model(model, c, str(tmp_path / 'on'))
  codes = np.array(_codes(model, 40))   # writable, for torch.from_numpy
  want = np.asarray(model.decode(jnp.asarray(codes)))
  tm = musicjax_torch.from_pretrained(str(tmp_path / 'on'))
  with torch.no_grad():
    got = tm.decode(torch.from_numpy(codes)).float().numpy()
  scale = np.max(np.abs(want))
  assert np.max(np.abs(got - want)) <= 1e-4 * scale
  # An export from before the key existed decodes without the filter.
  meta_path = tmp_path / 'on' / 'config.json'
  meta = json.loads(meta_path.read_text())
  del meta['model']['output_highpass_hz'], meta['model']['output_highpass_tolerance']
  meta_path.write_text(json.dumps(meta))
  old = musicjax_torch.from_pretrained(str(tmp_path / 'on'))
  with torch.no_grad():
    got_old = old.decode(torch.from_numpy(codes)).float().numpy()
  assert np.mean(got_old) > 0.5 * math.tanh(BIAS)   # the offset is back


def test_chunked_decode_equals_whole_decode_with_the_highpass():
  model = _model(CUTOFF_HZ)
  _set_out_bias(model, BIAS)
  codes = np.asarray(_codes(model, int(2.0 * model.frame_rate)))[0]
  whole = chunked.decode_array(model, codes, chunk_seconds=100.0, progress=False)
  # Context (0.5 s) past the filter's memory (0.22 s at 10 Hz / 1e-6).
  parts = chunked.decode_array(model, codes, chunk_seconds=0.25,
                               context_seconds=0.5, progress=False)
  assert parts.shape == whole.shape
  # Both remove the offset to float32 rounding (LEAK), in FFTs of other sizes.
  np.testing.assert_allclose(parts, whole,
                             atol=1e-5 * np.max(np.abs(whole)) + LEAK * BIAS)


# ------------------------------------------------------------------ gain
def _gain_config(path: str, batch: int = 16, seed: int = 0):
  c = cf.small_config()
  c.data.kind, c.data.path, c.data.eval_fraction = 'folder', path, 0.25
  c.data.batch_size = c.data.eval_batch_size = batch
  c.data.shuffle_seed = seed
  c.data.gain_augment_dbfs = GAIN_RANGE
  c.data.gain_augment_peak_dbfs = PEAK_CAP
  c.data.gain_augment_floor_dbfs = FLOOR
  return c


def _batches(c, split: str, n: int) -> list[np.ndarray]:
  it = iter(pipeline.audio_dataset(c, split))
  return [next(it)['audio'] for _ in range(n)]


def _levels(batch: np.ndarray) -> np.ndarray:
  return np.array([augment.to_dbfs(augment.rms(x)) for x in batch])


def test_training_segments_spread_over_the_gain_range_below_the_peak_cap(
    tmp_path):
  afx.good_folder(str(tmp_path), 4)     # 0.5-amplitude tones: -9 dBFS RMS
  c = _gain_config(str(tmp_path))
  levels = np.concatenate([_levels(b) for b in _batches(c, 'train', 4)])
  low, high = GAIN_RANGE
  assert np.all(levels >= low - 1e-3) and np.all(levels <= high + 1e-3)
  span = high - low
  assert levels.min() < low + span / 4 and levels.max() > high - span / 4
  assert np.std(levels) > span / 6       # U(low, high) has std span / 3.5
  for b in _batches(c, 'train', 2):
    assert np.max(np.abs(b)) <= augment.from_dbfs(PEAK_CAP) * (1 + 1e-6)
  # Eval segments keep the files' level.
  (ev,) = _batches(c, 'eval', 1)
  np.testing.assert_allclose(_levels(ev), augment.to_dbfs(0.5 / math.sqrt(2)),
                             atol=0.05)


def test_gain_is_deterministic_per_seed_and_resumes_exactly(tmp_path):
  afx.good_folder(str(tmp_path), 4)
  c = _gain_config(str(tmp_path), batch=4)
  a, b = _batches(c, 'train', 3), _batches(c, 'train', 3)
  assert np.ptp(_levels(np.concatenate(a))) > 1.0   # gains were drawn
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  other = _batches(_gain_config(str(tmp_path), batch=4, seed=1), 'train', 3)
  assert not all(np.array_equal(x, y) for x, y in zip(a, other))
  it = iter(pipeline.audio_dataset(c, 'train'))
  next(it)
  state = it.get_state()
  want = [next(it)['audio'] for _ in range(2)]
  fresh = iter(pipeline.audio_dataset(c, 'train'))
  fresh.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(fresh)['audio'], w)


def test_silence_stays_silence(tmp_path):
  for i in range(2):
    afx.write(str(tmp_path / f'silent{i}.wav'), np.zeros((12000, 1), np.float32),
              8000)
  for batch in _batches(_gain_config(str(tmp_path), batch=4), 'train', 2):
    assert not np.any(batch)
  rng = np.random.default_rng(0)
  quiet = 1e-4 * np.random.default_rng(1).standard_normal((800, 2))  # -80 dBFS
  out = augment.random_loudness(quiet, rng, GAIN_RANGE, PEAK_CAP, FLOOR)
  np.testing.assert_array_equal(out, quiet.astype(np.float32))


def test_a_bad_gain_range_is_a_config_error(tmp_path):
  afx.good_folder(str(tmp_path), 2)
  c = _gain_config(str(tmp_path))
  c.data.gain_augment_dbfs = (-10.0, -40.0)
  with pytest.raises(cfg.ConfigError, match='gain_augment_dbfs'):
    pipeline.audio_dataset(c, 'train')
