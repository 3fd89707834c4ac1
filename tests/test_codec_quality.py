"""`musicjax codec-quality`: its metric helpers, and the command end to end."""
import json
import math
import os
import shutil

import numpy as np
import pytest

from musicjax import cli
from musicjax.errors import UserError
from musicjax.codec import quality as cq
from musicjax.train import trainer
from tests import audio_fixtures as fx
from tests import codec_fixtures as cf

SR = 8000  # codec_fixtures.small_config
HALF_DB = 20 * math.log10(0.5)  # -6.02


def _sine(freq, seconds=2.0, sample_rate=SR, amplitude=0.5):
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  return (amplitude * np.sin(2 * np.pi * freq * t))[:, None]


# ----------------------------------------------------------------- metrics


def test_dc_offset_of_sine_plus_offset_is_the_offset():
  assert cq.dc_offset(_sine(440.0) + 0.1) == pytest.approx(0.1, abs=1e-9)
  assert cq.dc_offset(_sine(440.0)) == pytest.approx(0.0, abs=1e-9)


def test_low_band_share_of_20hz_and_1khz_sines():
  assert cq.low_band_share(_sine(20.0), SR) > 0.99
  assert cq.low_band_share(_sine(1000.0), SR) < 0.01
  # DC counts as below 40 Hz: a 1 kHz sine of power 0.125 plus DC 0.5 (0.25).
  assert cq.low_band_share(_sine(1000.0) + 0.5, SR) == pytest.approx(
      0.25 / 0.375, abs=1e-3)
  assert cq.low_band_share(np.zeros((SR, 1)), SR) == 0.0


def test_level_difference_of_a_signal_and_its_half():
  x = _sine(440.0)
  assert cq.level_difference_db(x, x / 2) == pytest.approx(HALF_DB, abs=1e-6)
  assert HALF_DB == pytest.approx(-6.02, abs=0.01)
  assert cq.level_difference_db(x, x) == pytest.approx(0.0, abs=1e-9)


def test_rms_dbfs_of_full_scale_sine_and_silence():
  assert cq.rms_dbfs(_sine(440.0, amplitude=1.0)) == pytest.approx(-3.0103, abs=1e-3)
  assert cq.rms_dbfs(np.zeros((100, 2))) == cq.SILENCE_DBFS


def test_quiet_copy_is_at_the_requested_level():
  x = _sine(440.0) + 0.05 * _sine(3000.0)
  quiet = cq.scale_to_dbfs(x, cq.DEFAULT_QUIET_DBFS)
  assert cq.rms_dbfs(quiet) == pytest.approx(cq.DEFAULT_QUIET_DBFS, abs=1e-4)
  assert quiet.dtype == np.float32
  with pytest.raises(ValueError, match='silent'):
    cq.scale_to_dbfs(np.zeros((10, 1)), -30.0)


def test_clip_start_skips_the_offset_when_the_file_is_long_enough():
  assert cq.clip_start(60.0, 10.0, 10.0) == 10.0
  assert cq.clip_start(15.0, 10.0, 10.0) == 5.0  # ends at the file's end
  assert cq.clip_start(4.0, 10.0, 10.0) == 0.0   # shorter: the whole file


def test_opus_decode_rate_notes_non_opus_rates():
  assert cq.opus_decode_rate(16000) == (16000, '')
  rate, note = cq.opus_decode_rate(44100)
  assert rate == cq.OPUS_FALLBACK_RATE and '44100' in note


# CI installs opus-tools (.ci/run), so there this runs or fails; elsewhere it
# is skipped without them.
@pytest.mark.skipif((shutil.which('opusenc') is None or
                     shutil.which('opusdec') is None) and not os.environ.get('CI'),
                    reason='opus-tools not installed (apt-get install opus-tools)')
def test_opus_roundtrip_keeps_length_and_level(tmp_path):
  for rate in (16000, 22050):  # native, and decoded at 48 kHz then resampled
    x = _sine(440.0, seconds=1.5, sample_rate=rate).astype(np.float32)
    y, kbps = cq.opus_roundtrip(x, rate, cq.DEFAULT_OPUS_KBPS, str(tmp_path))
    assert y.shape == x.shape
    assert abs(cq.level_difference_db(x, y)) < 3.0
    assert 0 < kbps < 4 * cq.DEFAULT_OPUS_KBPS


# -------------------------------------------------------------------- command


def test_missing_opusenc_names_the_install_and_the_skip(tmp_path, monkeypatch,
                                                         capsys):
  monkeypatch.setenv('PATH', str(tmp_path))  # no opusenc/opusdec on PATH
  with pytest.raises(UserError, match='apt-get install opus-tools'):
    cq.check_opus_tools(6.0)
  cq.check_opus_tools(0.0)  # Opus skipped: nothing needed
  rc = cli.main(['codec-quality', '--workdir', str(tmp_path), '--audio',
                 str(tmp_path)])
  err = capsys.readouterr().err
  assert rc == 2
  assert 'opusenc and opusdec are not on PATH' in err
  assert '--opus-kbps 0' in err


@pytest.mark.parametrize('flags, match', [
    (['--quiet-dbfs', '3'], '--quiet-dbfs'),
    (['--opus-kbps', '2'], '--opus-kbps'),
    (['--seconds', '0.1'], '--seconds'),
])
def test_bad_flags_name_the_flag(tmp_path, capsys, flags, match):
  rc = cli.main(['codec-quality', '--workdir', str(tmp_path), '--audio',
                 str(tmp_path)] + flags)
  assert rc == 2 and match in capsys.readouterr().err


def test_not_a_codec_run_names_workdir(tmp_path):
  fx.write(str(tmp_path / 'a.wav'), _sine(440.0), SR)
  with pytest.raises(UserError, match='--workdir .* has no config.json'):
    cq.run(str(tmp_path / 'nothing'), [str(tmp_path)], opus_kbps=0)


@pytest.fixture(scope='module')
def codec_run(tmp_path_factory):
  """The workdir of a tiny codec trained for 2 steps."""
  tmp = tmp_path_factory.mktemp('codec')
  data = str(tmp / 'data')
  fx.good_folder(data, 4, seconds=1.0, sample_rate=SR)
  c = cf.folder_run_config(data)
  wd = str(tmp / 'run')
  trainer.train(c, wd)
  return wd


def test_command_end_to_end_without_opus(codec_run, tmp_path, capsys):
  music = tmp_path / 'music'
  long_x = _sine(220.0, seconds=2.0) + _sine(1000.0, seconds=2.0, amplitude=0.2)
  fx.write(str(music / 'long.wav'), long_x + 0.01, SR)
  fx.write(str(music / 'sub' / 'short.flac'), _sine(330.0, seconds=1.2), SR)
  fx.write(str(music / 'silent.wav'), np.zeros((2 * SR, 1)), SR)
  out = str(tmp_path / 'q.json')
  rc = cli.main(['codec-quality', '--workdir', codec_run, '--audio', str(music),
                 '--seconds', '1.5', '--opus-kbps', '0', '--json', out])
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  with open(out) as f:
    result = json.load(f)

  rows = result['rows']
  assert sorted((r['clip'], r['copy']) for r in rows) == [
      ('long.wav', 'as_is'), ('long.wav', 'quiet'),
      (os.path.join('sub', 'short.flac'), 'as_is'),
      (os.path.join('sub', 'short.flac'), 'quiet')]
  for r in rows:
    values = list(r['input'].values()) + list(r['codec'].values())
    assert all(math.isfinite(v) for v in values), r
    assert 'opus' not in r
    if r['copy'] == 'quiet':
      assert r['input']['dbfs'] == pytest.approx(cq.DEFAULT_QUIET_DBFS, abs=1e-3)
  by = {(r['clip'], r['copy']): r for r in rows}
  # 2 s file, 1.5 s clip, 10 s offset: the clip is the file's last 1.5 s.
  assert by[('long.wav', 'as_is')]['start_seconds'] == pytest.approx(0.5)
  assert by[('long.wav', 'as_is')]['seconds'] == pytest.approx(1.5)
  assert by[('long.wav', 'as_is')]['input']['dc'] == pytest.approx(0.01, abs=1e-3)
  assert by[(os.path.join('sub', 'short.flac'), 'as_is')]['seconds'] == (
      pytest.approx(1.2))
  assert [s['file'] for s in result['skipped']] == [str(music / 'silent.wav')]

  assert result['opus'] is None
  c = result['codec']
  assert c['kbps'] == pytest.approx(
      c['num_codebooks'] * math.log2(c['codebook_size']) * c['frame_rate'] / 1000)
  assert set(result['means']) == {'as_is', 'quiet'}
  assert result['host']['cpu_model'] and 'load_avg_1m' in result['host']
  # The table: a line per clip and copy, the means, the bitrate.
  table = captured.out
  assert 'long.wav' in table and 'MEAN' in table and 'kbps' in table
  assert 'skipped (--opus-kbps 0)' in table
  assert '[3/3] sub/short.flac' in captured.err  # progress per file


def test_clips_limits_the_clips(codec_run, tmp_path):
  music = tmp_path / 'music'
  for i in range(3):
    fx.write(str(music / f'{i}.wav'), _sine(200.0 + 100 * i, seconds=1.5), SR)
  result = cq.run(codec_run, [str(music)], seconds=1.5, clips=1, opus_kbps=0,
                  progress=False)
  assert [(r['clip'], r['copy']) for r in result['rows']] == [
      ('0.wav', 'as_is'), ('0.wav', 'quiet')]
