"""Decoding, resampling, channels and the bad-file report."""
import logging
import numpy as np
import pytest

from musicjax.data import audio
from tests import audio_fixtures as fx


def test_load_resamples_and_mixes_down(tmp_path):
  x = fx.tone(0.5, 22050, 440.0, channels=2)
  path = fx.write(str(tmp_path / 'a.wav'), x, 22050)
  y = audio.load_audio(path, 8000, 1)
  assert y.dtype == np.float32
  assert y.shape == (4000, 1)
  # Mixdown of levels 1.0 and 0.9 -> 0.95 of the tone; check the RMS.
  np.testing.assert_allclose(np.sqrt(np.mean(y[200:-200] ** 2)),
                             0.95 * 0.5 / np.sqrt(2), rtol=0.02)
  spectrum = np.abs(np.fft.rfft(y[:, 0]))
  assert np.argmax(spectrum) * 8000 / len(y) == pytest.approx(440.0, abs=2.0)


def test_load_duplicates_mono_and_reads_a_window(tmp_path):
  sr = 8000
  ramp = (np.arange(sr, dtype=np.float32) / sr)[:, None]
  path = fx.write(str(tmp_path / 'ramp.wav'), ramp, sr, subtype='FLOAT')
  y = audio.load_audio(path, sr, 2, start_seconds=0.25, duration_seconds=0.5)
  assert y.shape == (4000, 2)
  np.testing.assert_array_equal(y[:, 0], y[:, 1])
  np.testing.assert_allclose(y[:, 0], ramp[2000:6000, 0])


def test_mp3_decodes(tmp_path):
  # The soundfile wheel bundles libsndfile >= 1.1, which reads and writes mp3.
  path = fx.write(str(tmp_path / 'a.mp3'), fx.tone(1.0, 16000, 300.0), 16000,
                  format='MP3')
  y = audio.load_audio(path, 8000, 1)
  assert abs(y.shape[0] - 8000) < 2000  # mp3 adds encoder padding
  spectrum = np.abs(np.fft.rfft(y[2000:6000, 0]))
  assert np.argmax(spectrum) * 8000 / 4000 == pytest.approx(300.0, abs=4.0)


@pytest.mark.parametrize('kind,reason', [
    ('corrupt', 'undecodable'),
    ('empty', 'empty file'),
    ('zero', 'zero-length'),
    ('nan', 'NaN or Inf'),
    ('inf', 'NaN or Inf'),
    ('short', 'shorter than a segment'),
    ('huge', 'too long'),
])
def test_check_file_rejects_with_reason(tmp_path, kind, reason):
  path = str(tmp_path / f'{kind}.wav')
  sr = 8000
  if kind == 'corrupt':
    with open(path, 'wb') as f:
      f.write(b'RIFF\x00\x01garbage' * 50)
  elif kind == 'empty':
    open(path, 'wb').close()
  elif kind == 'zero':
    fx.write(path, np.zeros((0, 1), np.float32), sr)
  elif kind in ('nan', 'inf'):
    x = fx.tone(1.0, sr, 200.0)
    x[100] = np.nan if kind == 'nan' else np.inf
    fx.write(path, x, sr, subtype='FLOAT')
  elif kind == 'short':
    fx.write(path, fx.tone(0.1, sr, 200.0), sr)
  else:
    fx.write(path, fx.tone(3.0, sr, 200.0), sr)
  with pytest.raises(audio.BadAudio, match=reason) as e:
    audio.check_file(path, min_seconds=0.25, max_seconds=2.0)
  assert e.value.path == path


def test_nan_in_decoded_window_is_bad(tmp_path):
  x = fx.tone(1.0, 8000, 200.0)
  x[10] = np.nan
  path = fx.write(str(tmp_path / 'n.wav'), x, 8000, subtype='FLOAT')
  with pytest.raises(audio.BadAudio, match='NaN'):
    audio.load_audio(path, 8000, 1)


def test_report_bad_logs_once_and_counts(caplog):
  with caplog.at_level(logging.WARNING, logger='musicjax.data'):
    audio.report_bad('/x/a.wav', 'corrupt')
    audio.report_bad('/x/a.wav', 'corrupt')
    audio.report_bad('/x/b.wav', 'empty')
  lines = [r.getMessage() for r in caplog.records]
  assert lines == ['musicjax: skipping bad audio file /x/a.wav: corrupt',
                   'musicjax: skipping bad audio file /x/b.wav: empty']
  assert fx.bad_under('/x/') == {'/x/a.wav': 'corrupt', '/x/b.wav': 'empty'}
  n = audio.bad_file_count()
  audio.report_bad('/x/c.wav', 'too long')
  assert audio.bad_file_count() == n + 1


def test_fit_length_pads_only_within_tolerance():
  x = np.ones((98, 1), np.float32)
  y = audio.fit_length(x, 100, 'n', tolerance=2)
  assert y.shape == (100, 1) and y[97, 0] == 1 and y[99, 0] == 0
  with pytest.raises(audio.BadAudio, match='shorter'):
    audio.fit_length(x, 101, 'n', tolerance=2)


def test_encode_flac_roundtrip():
  x = fx.tone(0.2, 8000, 250.0)
  data = audio.encode_flac(x, 8000)
  y = audio.load_audio(data, 8000, 1, name='mem')
  np.testing.assert_allclose(y, x, atol=1.0 / 2**15)
