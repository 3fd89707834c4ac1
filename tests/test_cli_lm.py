"""`musicjax generate` end to end: a tiny codec, real token preparation, a few
LM train steps through the CLI, then songs and the errors a user sees."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

from musicjax import cli
from musicjax.prepare import tokens as prepare_tokens
from musicjax.data import sources
from musicjax.data import token_records
from musicjax.train import trainer
from tests import audio_fixtures as fx
from tests import codec_fixtures as cf

SR = 8000             # codec_fixtures.small_config
SECONDS = 0.6
FILES = ('a', 'b', 'c', 'd', 'e')   # folder_split(0.3): a, b, e train; c, d eval
LYRICS = '[Verse]\nWie schön leuchtet der Morgenstern\n[Chorus]\nvoll Gnad und Wahrheit'
MAX_SEQ_LEN = 400

LM_CONFIG = '''
from musicjax.config import for_task


def get_config():
  c = for_task('lm')
  m = c.model
  m.num_codebooks, m.codebook_size = {k}, {v}
  m.text_vocab_size = 1024
  m.max_seq_len = {max_seq_len}
  for t in (m.backbone, m.local):
    t.dim, t.num_heads, t.num_kv_heads, t.mlp_dim = 32, 4, 2, 64
  m.backbone.num_layers = 2
  m.local.num_layers = 1
  d = c.data
  d.kind, d.path, d.layout = 'tokens', {path!r}, 'prefix'
  d.max_frames, d.max_text_tokens, d.reference_frames = 32, 48, 8
  d.batch_size = d.eval_batch_size = 8
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 2, 1, 2
  c.train.eval_every, c.train.eval_steps = 1000, 1
  c.sample.cfg_scale, c.sample.top_k = 1.5, 8
  return c
'''


def _songs(root):
  for i, name in enumerate(FILES):
    fx.write(os.path.join(root, f'{name}.wav'),
             fx.tone(SECONDS, SR, 220.0 * 2 ** (i / 12)), SR)
  metas = {'a': {'tags': 'genre: pop; mood: happy', 'lyrics': LYRICS},
           'b': {'bwv': '1.6', 'key': 'D major',
                 'lyrics': 'Ach Gott, wie manches Herzeleid',
                 'phrases': [{'start': 0.0, 'end': 0.3,
                              'text': 'Ach Gott, wie manches Herzeleid'}]}}
  for name, meta in metas.items():
    with open(os.path.join(root, f'{name}.json'), 'w', encoding='utf-8') as f:
      json.dump(meta, f, ensure_ascii=False)
  split = sources.folder_split(sources.list_audio_files(root), root, 0.3)
  assert {os.path.basename(p) for p in split['train']} == {'a.wav', 'b.wav', 'e.wav'}


def _untrained_codec(c, workdir):
  """A codec workdir (config.json + a checkpoint at step 1) of the freshly
  initialised tiny codec: what `musicjax prepare` and `generate` read from a
  trained one, without compiling a codec train step (the slow part)."""
  from musicjax import config as config_lib
  from musicjax.train import checkpoint as ckpt_lib
  c.model.rvq.kmeans_init = False   # usable codebooks without a first batch
  config_lib.save(c, workdir)
  s = trainer.setup(c)
  manager = ckpt_lib.make_manager(workdir, 1, False)
  try:
    with jax.set_mesh(s.mesh):
      ckpt_lib.save(manager, 1, trainer.init_state(s), None, force=True)
    manager.wait_until_finished()
  finally:
    manager.close()


@pytest.fixture(scope='module')
def lm_run(tmp_path_factory):
  """(tmp, LM workdir, dataset.json): codec -> tokens -> LM (2 CLI steps)."""
  tmp = tmp_path_factory.mktemp('cli_lm')
  src = str(tmp / 'songs')
  _songs(src)
  c = cf.small_config()
  c.data.kind, c.data.path, c.data.eval_fraction = 'folder', src, 0.3
  c.data.batch_size = c.data.eval_batch_size = 8   # one per forced CPU device
  c.data.records_per_shard = 2
  codec_wd = str(tmp / 'codec')
  _untrained_codec(c, codec_wd)
  tokens = str(tmp / 'tokens')
  result = prepare_tokens.prepare_tokens_main(codec_wd, tokens, c)
  assert (result['train'], result['eval']) == (3, 2), result
  info = token_records.read_dataset_info(tokens)
  config = tmp / 'lm_config.py'
  config.write_text(LM_CONFIG.format(k=info['num_codebooks'],
                                     v=info['codebook_size'],
                                     max_seq_len=MAX_SEQ_LEN, path=tokens))
  lm_wd = str(tmp / 'lm')
  assert cli.main(['train', '--config', str(config), '--workdir', lm_wd]) == 0
  return tmp, lm_wd, info


def _generate(lm_wd, *args):
  return cli.main(['generate', '--workdir', lm_wd, *args])


def test_generate_writes_song_tokens_and_spectrogram(lm_run, capsys):
  tmp, lm_wd, info = lm_run
  lyrics = tmp / 'lyrics.txt'
  lyrics.write_text(LYRICS, encoding='utf-8')
  out = str(tmp / 'out' / 'song.wav')
  seconds = 0.5
  assert _generate(lm_wd, '--tags', 'x', '--lyrics', str(lyrics), '--seconds',
                   str(seconds), '--out', out) == 0
  cap = capsys.readouterr()
  # The tag was never seen in training: a warning that names it.
  assert 'tags never seen in training: x' in cap.err, cap.err
  assert 'unconditional for lyrics' not in cap.err
  summary = json.loads(cap.out.strip().splitlines()[-1])
  base = out[:-len('.wav')]
  for path in (out, base + '.npz', base + '.png'):
    assert os.path.isfile(path) and os.path.getsize(path) > 0, path
  z = np.load(base + '.npz')
  codes = z['codes']
  n = len(codes)
  assert codes.ndim == 2 and codes.shape[1] == info['num_codebooks']
  assert 0 <= n <= round(seconds * info['frame_rate'])
  assert codes.min(initial=0) >= 0 and codes.max(initial=0) < info['codebook_size']
  assert summary['frames'] == n and summary['tokens'] == base + '.npz'
  request = json.loads(str(z['request']))
  assert request['lyrics'] == LYRICS and request['tags'] == 'x'
  wav = sf.info(out)
  assert wav.samplerate == info['sample_rate']
  assert wav.frames == n * info['hop_length']


def test_a_failed_decode_keeps_the_codes_and_writes_no_wav(lm_run,
                                                          monkeypatch):
  """The codes are saved first and whole; a decode that dies leaves no
  wav, png or temporary file behind."""
  from musicjax.codec import chunked
  tmp, lm_wd, _ = lm_run
  out_dir = tmp / 'failed'

  def broken(*args, **kwargs):
    raise RuntimeError('decoder died')

  monkeypatch.setattr(chunked, 'decode_array', broken)
  with pytest.raises(RuntimeError, match='decoder died'):
    _generate(lm_wd, '--seconds', '0.5', '--min-seconds', '0.2', '--out',
              str(out_dir / 'song.wav'))
  assert sorted(os.listdir(out_dir)) == ['song.npz']
  assert np.load(out_dir / 'song.npz')['codes'].ndim == 2


def test_min_seconds_and_streaming_callback(lm_run):
  """min_seconds holds END back, so the song has exactly that length; the
  stream callback sees the codes so far, in order, and they are the song's."""
  from musicjax import config as config_lib
  from musicjax.lm import song
  _, lm_wd, info = lm_run
  ctx = song.SongContext(config_lib.load_saved(lm_wd), lm_wd)
  seen = []

  def stream(frames, counts):
    n = int(np.asarray(counts)[0])
    seen.append((n, np.array(np.asarray(frames)[0, :n])))
  frames = round(0.5 * info['frame_rate'])
  codes = song.sample_codes(
      ctx, song.SongRequest(tags='x', seconds=0.5, min_seconds=0.5, seed=3),
      progress=False, stream=stream, stream_seconds=0.1)
  assert len(codes) == frames
  every = round(0.1 * info['frame_rate'])
  assert [n for n, _ in seen] == list(range(every, frames + 1, every))
  for n, part in seen:
    np.testing.assert_array_equal(part, codes[:n])


def test_generate_without_lyrics_and_with_known_tags(lm_run, capsys):
  tmp, lm_wd, info = lm_run
  empty = tmp / 'empty.txt'
  empty.write_text('\n  \n', encoding='utf-8')
  out = str(tmp / 'plain.wav')
  # --cfg 1: no guidance (one row, no null-condition rows).
  assert _generate(lm_wd, '--tags', 'pop, happy', '--lyrics', str(empty),
                   '--seconds', '0.1', '--cfg', '1', '--out', out) == 0
  err = capsys.readouterr().err
  assert 'unconditional for lyrics' in err, err
  assert 'never seen in training' not in err, err
  codes = np.load(out[:-len('.wav')] + '.npz')['codes']
  assert codes.shape[1] == info['num_codebooks']
  assert len(codes) <= round(0.1 * info['frame_rate'])


def test_generate_user_errors_exit_2(lm_run, capsys):
  tmp, lm_wd, info = lm_run
  missing = str(tmp / 'no_such_lyrics.txt')
  out = str(tmp / 'never.wav')
  assert _generate(lm_wd, '--lyrics', missing, '--out', out) == 2
  assert missing in capsys.readouterr().err
  # Longer than model.max_seq_len slots can hold.
  seconds = MAX_SEQ_LEN / info['frame_rate'] + 0.2
  assert _generate(lm_wd, '--seconds', str(seconds), '--out', out) == 2
  err = capsys.readouterr().err
  assert 'config.model.max_seq_len=400' in err, err
  assert _generate(str(tmp / 'nothing'), '--out', out) == 2
  assert "nothing' does not exist" in capsys.readouterr().err
  assert not os.path.exists(out)


def test_generate_help_exits_0():
  r = subprocess.run([sys.executable, '-m', 'musicjax.cli', 'generate', '--help'],
                     capture_output=True, text=True, timeout=60, check=False)
  assert r.returncode == 0, r.stderr
  for flag in ('--workdir', '--tags', '--lyrics', '--seconds', '--cfg', '--out'):
    assert flag in r.stdout, flag
