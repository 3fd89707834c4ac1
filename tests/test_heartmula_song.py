"""`musicjax generate` on an imported HeartMuLa run: text -> the imported LM
-> HeartCodec -> wav, with the released tokenizer and gen_config.json.

The released folder is built from the tiny fixtures (tests/fixtures/
heartmula_tiny, heartcodec_tiny; heartlib's layout). Greedy generation from
the fixture's tags and lyrics gives heartlib's own frames and stop
(decode.npz's text_frames, from heartlib's pipeline loop); the wav is
HeartCodec's decode of those codes with the seed's noise.
"""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import load_file, save_file

from musicjax import cli
from musicjax.export import heartmula_run
from musicjax.export.released import heartcodec
from musicjax.lm import generate as G
from musicjax.lm import heartmula_song
from musicjax.lm import model as model_lib
from musicjax.lm import song

import test_import_heartmula as imp_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODEC_FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'heartcodec_tiny')
LM_FIXTURE = imp_test.FIXTURE
# decode.npz's text: heartlib's pipeline made one frame from it, then stopped.
TAGS = 'Pop, Piano'
LYRICS = '[Verse]\nLa la the SUN rise\nover hills\n'
END, STOP_BOOK = 17, 4
VQ = 'flow_matching.vq_embed.layers.{}._codebook.'


def _codec_folder(path, quantizers: int) -> str:
  """The tiny HeartCodec with `quantizers` codebooks (the fixture has 3;
  the tiny LM makes 8): the extra codebooks are scaled copies."""
  os.makedirs(path)
  tensors = load_file(os.path.join(CODEC_FIXTURE, 'model.safetensors'))
  for i in range(3, quantizers):
    for name in ('cluster_size', 'embed', 'embed_avg', 'initted'):
      src = tensors[VQ.format(i % 3) + name]
      tensors[VQ.format(i) + name] = (src * (1 + 0.1 * i)).astype(src.dtype) \
          if name == 'embed' else src.copy()
  save_file(tensors, os.path.join(path, 'model.safetensors'))
  with open(os.path.join(CODEC_FIXTURE, 'config.json')) as f:
    config = json.load(f)
  config['num_quantizers'] = quantizers
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  return str(path)


def _heads_as_decode_b(folder: str) -> None:
  """The fixture's decode B weights (its README): head columns of classes
  >= END zeroed in every codebook but 4, so only codebook 4 can stop."""
  path = os.path.join(folder, 'model.safetensors')
  t = load_file(path)
  t['codebook0_head.weight'][END:] = 0.0
  for book in range(1, 8):
    if book != STOP_BOOK:
      t['audio_head'][book - 1][:, END:] = 0.0
  save_file(t, path)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """An imported run whose released folder has a matching HeartCodec."""
  tmp = tmp_path_factory.mktemp('song')
  root = imp_test.released(tmp / 'released')
  _heads_as_decode_b(os.path.join(root, 'HeartMuLa-oss-tiny'))
  shutil.rmtree(os.path.join(root, 'HeartCodec-oss'))
  _codec_folder(os.path.join(root, 'HeartCodec-oss'), 8)
  workdir = str(tmp / 'run')
  assert imp_test._import(root, workdir) == 0
  return workdir


def _generate(run, out, *extra) -> dict:
  assert cli.main(['generate', '--workdir', run, '--tags', TAGS, '--out', out,
                   *extra]) == 0
  return out


@pytest.fixture(scope='module')
def lyrics(tmp_path_factory):
  path = tmp_path_factory.mktemp('text') / 'lyrics.txt'
  path.write_text(LYRICS)
  return str(path)


def test_greedy_song_is_heartlibs_frames_then_heartcodec(run, lyrics, tmp_path):
  """Top-k 1 with the fixture's text: heartlib's one frame and its stop;
  the wav is HeartCodec's decode of it (seed 3's noise) at the codec's rate."""
  with np.load(os.path.join(LM_FIXTURE, 'decode.npz')) as f:
    want = f['text_frames']                            # [1, K]
  out = _generate(run, str(tmp_path / 'song.wav'), '--lyrics', lyrics,
                  '--top-k', '1', '--seed', '3', '--seconds', '3')
  with np.load(str(tmp_path / 'song.npz')) as f:
    codes = f['codes']
  np.testing.assert_array_equal(codes, want)
  wave, sr = sf.read(out, dtype='float32', always_2d=True)
  codec = heartcodec.load(os.path.join(os.path.dirname(run), 'released',
                                       'HeartCodec-oss'))
  assert sr == codec.config.sample_rate
  ref = codec.detokenize(codes[None], rng=jax.random.key(3))[0]
  assert wave.shape == ref.shape == (24, 2)        # 1 code x 24 samples, stereo
  # The wav holds 16-bit PCM: within one step of it.
  np.testing.assert_allclose(wave, np.clip(ref, -1, 1), atol=2 / 2 ** 15)
  assert os.path.isfile(str(tmp_path / 'song.png'))
  assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_sampled_song_runs_to_length_with_decodable_codes(run, tmp_path):
  """Top-k sampling over all 21 classes with min-seconds = seconds: the song
  has every frame, no code reaches the special rows (16..20), and the loop's
  codes equal a direct generate call on the same prompt and seed."""
  seconds = 2.0
  _generate(run, str(tmp_path / 'a.wav'), '--top-k', '0', '--seed', '1',
            '--seconds', str(seconds), '--min-seconds', str(seconds))
  with np.load(str(tmp_path / 'a.npz')) as f:
    codes = f['codes']
  assert codes.shape == (int(seconds * 12.5), 8)
  assert codes.max() < 16
  ctx = heartmula_run.open_song(run)
  req = song.SongRequest(tags=TAGS, seconds=seconds, min_seconds=seconds,
                         seed=1, top_k=0)
  np.testing.assert_array_equal(
      heartmula_song.sample_codes(ctx, req, progress=False), codes)
  wave, _ = sf.read(str(tmp_path / 'a.wav'), always_2d=True)
  assert wave.shape == (len(codes) * 24, 2)


def test_codec_classes_mask_only_the_special_rows():
  """Sampling.codec_classes removes [codebook, END) and nothing else."""
  logits = np.zeros((1, 21), np.float32)
  logits[0, 16] = 10.0                                # a special row wins ...
  out = np.asarray(G._no_specials(logits, 16, 17))
  assert out[0, 16] == -np.inf and np.all(out[0, :16] == 0)
  assert out[0, 17] == 0 and out[0, 20] == 0          # ... END and up stay
  np.testing.assert_array_equal(G._no_specials(logits, 0, 17), logits)


def test_default_length_comes_from_the_config(run, tmp_path):
  """No --seconds: config.sample.seconds (here overridden to 0.4 s = 5
  frames); the song cannot end early with min-seconds."""
  _generate(run, str(tmp_path / 'b.wav'), '--config.sample.seconds=0.4',
            '--min-seconds', '0.4')
  with np.load(str(tmp_path / 'b.npz')) as f:
    assert len(f['codes']) == 5


def _fails(capsys, argv, match):
  """The command exits 2 with a message matching `match` and no output."""
  assert cli.main(argv) == 2
  assert re.search(match, capsys.readouterr().err), match


def test_unsupported_inputs_and_missing_codec_are_named(run, tmp_path, capsys):
  wav, out = str(tmp_path / 'x.wav'), str(tmp_path / 'o.wav')
  sf.write(wav, np.zeros(300, np.float32), 300)
  base = ['generate', '--workdir', run, '--out', out]
  _fails(capsys, base + ['--melody', wav], '--melody: the released model')
  _fails(capsys, base + ['--codec-workdir', str(tmp_path / 'nope')],
         '--codec-workdir .*nope: no such directory')
  three = _codec_folder(str(tmp_path / 'codec3'), 3)
  _fails(capsys, base + ['--codec-workdir', three],
         '3 x 16 codes but the LM .* 8 x 16')
  _fails(capsys, base + ['--seconds', '60'], 'max_seq_len=64')
  assert not os.path.exists(out)


def test_end_id_reaches_the_sampler(run):
  """The imported run's END is config, not layout (17, not 16)."""
  ctx = heartmula_run.open_song(run)
  assert model_lib.end_id(ctx.config.model) == 17
