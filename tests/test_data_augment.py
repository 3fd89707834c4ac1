"""Prepare-time audio augmentation (musicjax/data/augment.py): cookbook
biquads, the frequency-balance chain, tempo and pitch, and the metadata that
follows them."""
import numpy as np
import pytest
from scipy import signal

from musicjax.data import augment

SR = 24000
GAIN_TOLERANCE_DB = 0.1
# (kind, gain dB, frequency Hz, Q): the gain holds at the point named below.
FILTERS = [
    (augment.LOW_SHELF, -4.0, 120.0, 0.8),
    (augment.LOW_SHELF, -2.0, 180.0, 1.1),
    (augment.PEAKING, 2.5, 2000.0, 0.6),
    (augment.PEAKING, 1.0, 1200.0, 1.2),
    (augment.HIGH_SHELF, 3.5, 4500.0, 0.6),
    (augment.HIGH_SHELF, 1.0, 3200.0, 1.0),
]


def _db_at(b, a, freqs):
  _, h = signal.freqz(b, a, worN=np.asarray(freqs, float), fs=SR)
  return 20 * np.log10(np.abs(h))


@pytest.mark.parametrize('kind,gain,freq,q', FILTERS)
def test_cookbook_biquads_have_the_requested_gain(kind, gain, freq, q):
  b, a = augment.biquad_coefficients(kind, gain, freq, q, SR)
  assert a[0] == 1.0
  dc, center, nyquist = _db_at(b, a, [0.0, freq, SR / 2])
  # Shelves: the full gain on their side, none on the other; the peak: the
  # gain at its center, none at either end.
  want = {augment.LOW_SHELF: (gain, None, 0.0),
          augment.PEAKING: (0.0, gain, 0.0),
          augment.HIGH_SHELF: (0.0, None, gain)}[kind]
  for got, w in zip((dc, center, nyquist), want):
    if w is not None:
      assert abs(got - w) < GAIN_TOLERANCE_DB, (kind, got, w)
  # A shelf is halfway (in dB) at its midpoint frequency.
  if kind != augment.PEAKING:
    assert abs(center - gain / 2) < GAIN_TOLERANCE_DB


def test_biquad_rejects_frequencies_past_nyquist():
  with pytest.raises(ValueError, match='Nyquist'):
    augment.biquad_coefficients(augment.PEAKING, 1.0, SR, 1.0, SR)


def test_drawn_parameters_stay_in_the_paper_ranges():
  spec = augment.FREQUENCY_BALANCE
  for seed in range(50):
    drawn = augment.sample_biquads(np.random.default_rng(seed), SR)
    assert [f.kind for f in drawn] == [augment.LOW_SHELF, augment.PEAKING,
                                       augment.HIGH_SHELF]
    for f, band in zip(drawn, spec.bands):
      for value, (lo, hi) in ((f.gain_db, band.gain_db), (f.freq_hz, band.freq_hz),
                              (f.q, band.q)):
        assert lo <= value <= hi
  # A treble center past what the sample rate allows is lowered below Nyquist.
  low_rate = 8000
  for seed in range(20):
    treble = augment.sample_biquads(np.random.default_rng(seed), low_rate)[-1]
    assert treble.freq_hz <= augment.MAX_CENTER_FRACTION * low_rate


def _music(seconds=1.0, channels=2, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * SR)) / SR
  tones = sum(np.sin(2 * np.pi * f * t) for f in (110.0, 440.0, 3000.0))
  x = 0.05 * tones[:, None] + 0.02 * rng.standard_normal((len(t), channels))
  return x.astype(np.float32)


def test_frequency_balance_levels_shape_and_determinism():
  x = _music()
  y = augment.frequency_balance(x, SR, np.random.default_rng(3))
  assert y.shape == x.shape and y.dtype == np.float32
  spec = augment.FREQUENCY_BALANCE
  assert abs(augment.to_dbfs(augment.rms(y)) - spec.target_rms_dbfs) <= 0.1
  assert augment.to_dbfs(np.max(np.abs(y))) <= spec.peak_cap_dbfs + 1e-6
  np.testing.assert_array_equal(
      y, augment.frequency_balance(x, SR, np.random.default_rng(3)))
  other = augment.frequency_balance(x, SR, np.random.default_rng(4))
  assert not np.allclose(y, other)
  # The bass goes down relative to the treble: compare the band energies.
  def band(z, lo, hi):
    spec_ = np.abs(np.fft.rfft(z[:, 0])) ** 2
    f = np.fft.rfftfreq(len(z), 1 / SR)
    return spec_[(f >= lo) & (f < hi)].sum()
  assert band(y, 100, 120) / band(y, 2900, 3100) < band(x, 100, 120) / band(
      x, 2900, 3100)


def test_peak_cap_wins_over_the_rms_target():
  x = np.zeros((SR, 1), np.float32)
  x[::SR // 4] = 1.0  # clicks: a crest factor far above 15 dB
  y = augment.normalize_loudness(x, -16.0, -1.0)
  assert abs(augment.to_dbfs(np.max(np.abs(y))) - -1.0) < 1e-6
  assert augment.to_dbfs(augment.rms(y)) < -16.0
  silent = np.zeros((100, 1), np.float32)
  np.testing.assert_array_equal(augment.normalize_loudness(silent, -16, -1), silent)


@pytest.mark.parametrize('rate', [0.8, 1.2])
def test_time_stretch_changes_the_length_by_one_over_rate(rate):
  x = _music(seconds=0.5)
  y = augment.time_stretch(x, SR, rate)
  assert y.shape[1] == x.shape[1] and y.dtype == np.float32
  assert abs(len(y) - len(x) / rate) <= 1
  mono = augment.time_stretch(x[:, 0], SR, rate)
  assert mono.ndim == 1 and abs(len(mono) - len(x) / rate) <= 1


def test_pitch_shift_keeps_the_length_and_moves_the_pitch():
  t = np.arange(SR // 2) / SR
  x = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)[:, None]
  y = augment.pitch_shift(x, SR, 2)
  assert y.shape == x.shape and y.dtype == np.float32
  spectrum = np.abs(np.fft.rfft(y[:, 0]))
  peak = np.fft.rfftfreq(len(y), 1 / SR)[np.argmax(spectrum)]
  assert abs(peak - 440.0 * 2 ** (2 / 12)) < 10.0, peak


def test_levels_and_activity():
  hop = 100
  x = np.zeros((1000, 1), np.float32)
  x[:300] = 0.5        # 3 of 10 frames at -6 dBFS
  assert augment.active_fraction(x, hop, -40.0) == pytest.approx(0.3)
  assert augment.to_dbfs(augment.rms(np.zeros(10))) == augment.SILENCE_DBFS
  assert augment.to_dbfs(1.0) == 0.0
  assert len(augment.frame_dbfs(np.zeros(1001), hop)) == 11  # ceil, like the codec


def test_seeds_and_hashes_are_stable():
  a = augment.song_rng(0, 'song', 'eq', 1).random()
  assert a == augment.song_rng(0, 'song', 'eq', 1).random()
  assert a != augment.song_rng(0, 'song', 'eq', 2).random()
  assert a != augment.song_rng(1, 'song', 'eq', 1).random()
  u = [augment.unit_hash(0, f's{i}', 'x') for i in range(200)]
  assert all(0 <= v < 1 for v in u) and 0.3 < np.mean(u) < 0.7
  # A fixed value: the hash must never depend on the process (PYTHONHASHSEED).
  assert augment.stable_int('a', 1) == augment.stable_int('a', '1')
  assert augment.stable_int('song') == 6791433785182058339


def test_metadata_follows_tempo_and_pitch():
  meta = {'key': 'B- major', 'tempo_bpm': 80.0, 'duration_seconds': 10.0,
          'phrases': [{'start': 0.0, 'end': 2.2, 'text': 'a'}],
          'sections': [{'name': 'verse', 'start': 1.1, 'end': 4.4}, 'odd'],
          'first_soprano_midi': 67}
  s = augment.stretch_meta(meta, 1.1)
  assert s['phrases'][0]['end'] == pytest.approx(2.0)
  assert s['sections'][0]['start'] == pytest.approx(1.0)
  assert s['sections'][1] == 'odd'  # left for song_text to report
  assert s['tempo_bpm'] == pytest.approx(88.0)
  assert s['duration_seconds'] == pytest.approx(10 / 1.1)
  assert s['augment'] == {'time_stretch': 1.1} and meta['phrases'][0]['end'] == 2.2
  p = augment.shift_meta(meta, 2)
  assert p['key'] == 'C major' and p['first_soprano_midi'] == 69
  assert p['augment'] == {'pitch_shift': 2.0}
  assert augment.shift_meta({'key': 'E- minor'}, 1)['key'] == 'E minor'
  assert augment.shift_meta({'key': 'Eb major'}, -2)['key'] == 'Db major'
  assert augment.shift_meta({'key': 'F# minor'}, 1)['key'] == 'G minor'
  assert 'key' not in augment.shift_meta({'key': 'whatever'}, 1)
  assert 'key' not in augment.shift_meta({'key': 'C major'}, 0.5)
