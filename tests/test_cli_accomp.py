"""`musicjax accompany` and `musicjax eval` (accomp) end to end: stem folders,
an untrained tiny codec, real token preparation with --stems, two CLI train
steps, then a mix whose vocal is untouched, the audio-metric table, and the
errors a user sees."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from musicjax import cli
from musicjax.accomp import song as song_lib
from musicjax.prepare import tokens as prepare_tokens
from musicjax.data import token_records
from tests import audio_fixtures as fx
from tests import codec_fixtures as cf
from tests.test_cli_lm import _untrained_codec

SR = 8000             # codec_fixtures.small_config
SECONDS = 1.2
SONGS = ('a', 'b', 'c', 'd', 'e', 'f')

ACCOMP_CONFIG = '''
from musicjax.config import for_task


def get_config():
  c = for_task('accomp')
  m = c.model
  m.num_codebooks, m.codebook_size, m.frame_rate = {k}, {v}, {rate}
  m.text_vocab_size = 1024
  b = m.backbone
  b.num_layers, b.dim, b.num_heads, b.num_kv_heads, b.mlp_dim = 2, 32, 4, 2, 64
  b.attention_chunk = 8
  d = c.data
  d.kind, d.path = 'tokens', {path!r}
  d.max_frames, d.max_text_tokens, d.reference_frames = 16, 16, 4
  d.batch_size = d.eval_batch_size = 8
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 2, 1, 2
  c.train.eval_every, c.train.eval_steps = 1000, 1
  c.sample.steps = 4
  c.sample.window_frames, c.sample.overlap_frames = 12, 4
  return c
'''


def _stem_songs(root):
  for i, name in enumerate(SONGS):
    song = os.path.join(root, name)
    os.makedirs(song)
    f0 = 220.0 * 2 ** (i / 12)
    fx.write(os.path.join(song, 'vocals.wav'), fx.tone(SECONDS, SR, 2 * f0), SR)
    fx.write(os.path.join(song, 'accompaniment.wav'), fx.tone(SECONDS, SR, f0), SR)
    with open(os.path.join(song, 'meta.json'), 'w', encoding='utf-8') as f:
      json.dump({'tags': 'genre: chorale; mood: calm'}, f)


@pytest.fixture(scope='module')
def accomp_run(tmp_path_factory):
  """(tmp, accomp workdir, dataset.json): codec -> stem tokens -> 2 steps."""
  tmp = tmp_path_factory.mktemp('cli_accomp')
  src = str(tmp / 'songs')
  _stem_songs(src)
  c = cf.small_config()
  c.data.kind, c.data.path, c.data.eval_fraction = 'folder', src, 0.4
  c.data.records_per_shard = 2
  c.data.batch_size = c.data.eval_batch_size = 8   # one per forced CPU device
  codec_wd = str(tmp / 'codec')
  _untrained_codec(c, codec_wd)
  tokens = str(tmp / 'tokens')
  result = prepare_tokens.prepare_tokens_main(codec_wd, tokens, c, stems=True)
  assert result['eval'] >= 2, result
  info = token_records.read_dataset_info(tokens)
  config = tmp / 'accomp_config.py'
  config.write_text(ACCOMP_CONFIG.format(k=info['num_codebooks'],
                                         v=info['codebook_size'],
                                         rate=info['frame_rate'], path=tokens))
  wd = str(tmp / 'accomp')
  assert cli.main(['train', '--config', str(config), '--workdir', wd]) == 0
  return tmp, wd, info


def test_accompany_writes_mix_and_stem_and_never_alters_the_vocal(accomp_run,
                                                                  capsys):
  tmp, wd, info = accomp_run
  # A stereo vocal at another rate than the codec's: the mix keeps both.
  vocal_sr = 11025
  mono = fx.tone(SECONDS, vocal_sr, 440.0)[:, 0] * 0.5
  vocal = np.stack([mono, -0.5 * mono], axis=1).astype(np.float32)
  vpath = str(tmp / 'vocal.wav')
  sf.write(vpath, vocal, vocal_sr, subtype='FLOAT')
  mix, stem = str(tmp / 'out' / 'mix.wav'), str(tmp / 'out' / 'accomp.wav')
  assert cli.main(['accompany', '--workdir', wd, '--vocal', vpath, '--tags',
                   'chorale', '--steps', '4', '--seed', '0', '--out', mix,
                   '--stem', stem]) == 0
  cap = capsys.readouterr()
  summary = json.loads(cap.out.strip().splitlines()[-1])
  assert 'step 4/' in cap.err            # progress lines with an ETA
  base = stem[:-len('.wav')]
  for path in (mix, stem, base + '.npz', base + '.png'):
    assert os.path.isfile(path) and os.path.getsize(path) > 0, path
  frames = int(np.ceil(len(mono) / vocal_sr * SR / info['hop_length']))
  codes = np.load(base + '.npz')['codes']
  assert summary['frames'] == len(codes)
  assert abs(len(codes) - frames) <= 1
  assert codes.min() >= 0 and codes.max() < info['codebook_size']
  m, msr = sf.read(mix, dtype='float32', always_2d=True)
  s, ssr = sf.read(stem, dtype='float32', always_2d=True)
  assert msr == vocal_sr and m.shape == vocal.shape and ssr == info['sample_rate']
  # mix - the resampled stem (the same on both channels) == the vocal exactly.
  np.testing.assert_allclose(m - song_lib.mix_with_vocal(
      np.zeros_like(vocal), vocal_sr, s, ssr), vocal, atol=1e-6)


def test_same_seed_same_accompaniment_and_windows_cover_the_song(accomp_run):
  tmp, wd, _ = accomp_run
  from musicjax import config as config_lib
  config = config_lib.load_saved(wd)
  ctx = song_lib.AccompContext(config, wd)
  k = config.model.num_codebooks
  vocal = np.random.default_rng(0).integers(0, config.model.codebook_size,
                                            (30, k))
  s = song_lib.sampling_for(config, song_lib.AccompRequest(vocal_path=''))
  text = ctx.text_ids('chorale')
  a = song_lib.accompany_codes(ctx, vocal, text, None, s, 3, progress=False)
  b = song_lib.accompany_codes(ctx, vocal, text, None, s, 3, progress=False)
  c = song_lib.accompany_codes(ctx, vocal, text, None, s, 4, progress=False)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (30, k) and (a != c).any()
  # Windows of 12 frames overlapping by 4 cover 30 frames: 0-12, 8-20, 16-28,
  # 24-30 (padded).
  assert song_lib.windows(30, 12, 4) == [0, 8, 16, 24]
  assert song_lib.windows(28, 12, 4) == [0, 8, 16]
  assert song_lib.windows(10, 12, 4) == [0]


def test_unmasking_trace_follows_the_schedule_and_keeps_commitments(accomp_run):
  """The notebook's step-by-step picture: after each step the masked count
  is the cosine schedule's, committed tokens never change, nothing is masked
  at the end, and the last state is what the sampler returns."""
  from musicjax import config as config_lib
  from musicjax.accomp import diffusion
  from musicjax.accomp import model as model_lib
  from musicjax.accomp import sample as sample_lib
  _, wd, _ = accomp_run
  config = config_lib.load_saved(wd)
  ctx = song_lib.AccompContext(config, wd)
  k, v = config.model.num_codebooks, config.model.codebook_size
  vocal = np.random.default_rng(1).integers(0, v, (10, k))
  s = sample_lib.Sampling(steps=6)
  states = song_lib.unmasking_trace(ctx, vocal, ctx.text_ids('chorale'), s, 5)
  assert states.shape == (6, 10, k)
  mask = model_lib.mask_id(v)
  masked = (states == mask).reshape(6, -1).sum(1)
  total = np.array([10 * k])
  want = [int(diffusion.num_masked_after(i, 6, total, total if i == 0 else
                                         np.array([masked[i - 1]]))[0])
          for i in range(6)]
  assert masked.tolist() == want and masked[-1] == 0
  for i in range(1, 6):
    done = states[i - 1] != mask
    np.testing.assert_array_equal(states[i][done], states[i - 1][done])
  with pytest.raises(Exception, match='one sampler'):
    song_lib.unmasking_trace(ctx, np.zeros((10_000, k), int),
                             ctx.text_ids(''), s, 0)


def test_eval_reports_model_ceiling_and_baselines(accomp_run, capsys):
  tmp, wd, _ = accomp_run
  out = str(tmp / 'eval')
  assert cli.main(['eval', '--workdir', wd, '--songs', '2', '--seconds', '1.0',
                   '--steps', '2', '--out', out]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  audio = result['audio']
  assert audio['songs'] == 2
  rows = audio['metrics']
  assert set(rows) == {'model', 'codec_ceiling', 'other_song', 'silence',
                       'vocal_copy'}
  for row in rows.values():
    assert set(row) == {'onset_f1', 'beat_f1', 'chroma_sim'}
    assert all(np.isfinite(v) for v in row.values())
  assert rows['silence']['chroma_sim'] == 0.0
  assert 'loss' in result and os.path.isfile(os.path.join(out, 'accomp_eval.md'))


def test_accompany_user_errors_exit_2(accomp_run, capsys):
  tmp, wd, _ = accomp_run
  out, stem = str(tmp / 'never.wav'), str(tmp / 'never_stem.wav')
  missing = str(tmp / 'no_such_vocal.wav')
  assert cli.main(['accompany', '--workdir', wd, '--vocal', missing, '--out', out,
                   '--stem', stem]) == 2
  assert missing in capsys.readouterr().err
  bad = tmp / 'bad.wav'
  bad.write_bytes(b'not audio at all')
  assert cli.main(['accompany', '--workdir', wd, '--vocal', str(bad), '--out',
                   out, '--stem', stem]) == 2
  assert 'bad.wav' in capsys.readouterr().err
  assert not os.path.exists(out) and not os.path.exists(stem)


def test_accompany_help_exits_0():
  r = subprocess.run([sys.executable, '-m', 'musicjax.cli', 'accompany', '--help'],
                     capture_output=True, text=True, timeout=60, check=False)
  assert r.returncode == 0, r.stderr
  for flag in ('--workdir', '--vocal', '--tags', '--reference', '--steps',
               '--seed', '--out', '--stem'):
    assert flag in r.stdout, flag
