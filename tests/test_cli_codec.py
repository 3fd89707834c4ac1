"""End to end through the CLI: train the codec on real chorales, eval, encode,
decode, and the errors a user sees."""
import json
import os

import numpy as np
import pytest
import soundfile as sf

from musicjax import cli
from musicjax.codec import chunked
from musicjax.train import runs
from tests import audio_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'codec', 'tiny.py')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A codec trained for a few steps on two rendered chorales."""
  tmp = tmp_path_factory.mktemp('cli')
  wd = str(tmp / 'run')
  args = ['train', '--config', TINY, '--workdir', wd,
          f'--config.data.cache_dir={tmp / "cache"}', '--config.data.max_pieces=2',
          '--config.data.batch_size=8', '--config.data.eval_batch_size=8',
          '--config.train.steps=3', '--config.train.log_every=1',
          '--config.train.eval_every=3', '--config.train.eval_steps=1',
          '--config.train.checkpoint_every=3']
  assert cli.main(args) == 0
  return tmp, wd


@pytest.mark.slow
def test_train_then_eval_prints_json(trained, capsys):
  _, wd = trained
  recs = [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))]
  # Step 0: the untrained baseline (the tiny config sets train.eval_at_start).
  assert [r['step'] for r in recs] == [0, 1, 2, 3]
  assert all(np.isfinite(r['loss/total']) for r in recs[1:])
  assert cli.main(['eval', '--workdir', wd, '--num-batches', '1']) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['step'] == 3
  for k in ('mel_distance', 'stft_distance', 'si_sdr', 'bitrate'):
    assert np.isfinite(out[k]), k
  # The eval command reproduces the eval the trainer logged at that step.
  assert out['mel_distance'] == pytest.approx(recs[-1]['eval/mel_distance'], rel=1e-5)


@pytest.mark.slow
def test_encode_decode_any_rate_and_channels(trained):
  tmp, wd = trained
  wav = fx.write(str(tmp / 'in.wav'), fx.tone(2.5, 44100, 330.0, channels=2), 44100)
  npz, out = str(tmp / 'c.npz'), str(tmp / 'out.wav')
  # 1-second chunks force the chunked path on a 2.5 s file.
  assert cli.main(['encode', '--workdir', wd, '--chunk-seconds', '1', wav, npz]) == 0
  assert cli.main(['decode', '--workdir', wd, '--chunk-seconds', '1', npz, out]) == 0
  z = np.load(npz)
  sr = int(z['sample_rate'])
  assert z['codes'].shape == (int(np.ceil(z['num_samples'] / z['hop_length'])),
                              int(z['n_q']))
  y, sr_out = sf.read(out)
  assert sr_out == sr and len(y) == int(z['num_samples']) == round(2.5 * sr)
  # Chunked encoding equals encoding the whole file in one call.
  from musicjax.data import audio
  model = runs.load_run(wd).model
  x = audio.load_audio(wav, sr, 1)
  whole = chunked.encode_array(model, x, chunk_seconds=100.0)
  np.testing.assert_array_equal(z['codes'], whole)
  # Fewer codebooks: a lower bitrate that still decodes.
  npz2 = str(tmp / 'c2.npz')
  assert cli.main(['encode', '--workdir', wd, '--n-q', '1', wav, npz2]) == 0
  assert np.load(npz2)['codes'].shape[1] == 1
  assert cli.main(['decode', '--workdir', wd, npz2, str(tmp / 'o2.wav')]) == 0


@pytest.mark.slow
def test_user_errors_exit_2_with_a_message(trained, capsys):
  tmp, wd = trained
  bad = tmp / 'bad.npz'
  bad.write_bytes(b'not a zip')
  assert cli.main(['decode', '--workdir', wd, str(bad), str(tmp / 'x.wav')]) == 2
  assert 'bad.npz' in capsys.readouterr().err
  assert cli.main(['encode', '--workdir', wd, str(tmp / 'missing.wav'),
                   str(tmp / 'y.npz')]) == 2
  assert 'missing.wav' in capsys.readouterr().err
  assert cli.main(['encode', '--workdir', wd, '--n-q', '99',
                   fx.write(str(tmp / 'a.wav'), fx.tone(0.5, 16000, 200.0), 16000),
                   str(tmp / 'z.npz')]) == 2
  assert '--n-q' in capsys.readouterr().err


def test_config_errors_exit_2_before_compiling(tmp_path, capsys):
  wd = str(tmp_path / 'w')
  assert cli.main(['train', '--config', TINY, '--workdir', wd,
                   '--config.train.stepz=3']) == 2
  assert 'config.train.stepz' in capsys.readouterr().err
  assert cli.main(['train', '--config', TINY, '--workdir', wd,
                   '--config.mesh.data=3']) == 2
  assert 'config.mesh' in capsys.readouterr().err
  assert not os.path.exists(os.path.join(wd, 'checkpoints'))
  os.makedirs(tmp_path / 'empty')
  assert cli.main(['eval', '--workdir', str(tmp_path / 'empty')]) == 2
  assert 'no config.json' in capsys.readouterr().err
  for verb in (['eval'], ['export', '--out', str(tmp_path / 'x')]):
    assert cli.main([*verb, '--workdir', str(tmp_path / 'nothing')]) == 2
    assert 'nothing' + "' does not exist" in capsys.readouterr().err
  # A new run: the missing config is what to fix.
  assert cli.main(['train', '--workdir', str(tmp_path / 'new')]) == 2
  assert 'pass --config' in capsys.readouterr().err
