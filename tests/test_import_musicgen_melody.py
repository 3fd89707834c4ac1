"""MusicGen-Melody in transformers' layout
(MusicgenMelodyForConditionalGeneration.save_pretrained + the feature
extractor's preprocessor_config.json + a T5 tokenizer.json) -> our
single_stream AudioLM with `conditioning` 'prefix': the chroma one-hots of
MusicgenMelodyFeatureExtractor, the same teacher-forced logits and loss, the
same greedy codes and guided logits (with and without text or melody),
import -> export -> from_pretrained bit for bit, `generate --melody`, and bad
input named. The models are tiny random ones built here (no network).

torchaudio (which the feature extractor builds its STFT with) is not
installed: `_extractor` gives it a stand-in `Spectrogram`, torchaudio's
definition over torch.stft (periodic Hann window, reflect-centred, divided by
the window's norm, |X|^power); the padding, filter bank, normalisation and
one-hot are transformers' own code.
"""
import importlib
import json
import os
import re
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import nnx
from safetensors.numpy import load_file

from musicjax import cli
from musicjax.export import import_musicgen
from musicjax.export.released import musicgen
from musicjax.lm import generate as gen
from musicjax.lm import musicgen_chroma
from musicjax.lm import musicgen_song
from musicjax.lm import song

import released_fixtures as rf
import test_import_musicgen as M

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('tokenizers')

# The tiny MusicGens' numbers (test_import_musicgen.tiny_parts).
B, K, V, L, SR, HOP, T5_VOCAB, WORDS = (M.B, M.K, M.V, M.L, M.SR, M.HOP,
                                        M.T5_VOCAB, M.WORDS)
CHROMA_LENGTH = 8
# The tiny extractor: 8 kHz (EnCodec's rate here), 31.25 chroma frames/s.
TINY = musicgen_chroma.ChromaSettings(sampling_rate=SR, n_fft=1024,
                                      hop_length=256, chunk_length=2)
# float32 on both sides, logits peaking near 10 (heads scaled up): the gap is
# summation order; measured up to 3.8e-6 teacher-forced and guided at scale
# 1, 1.3e-5 at scale 3 (2026-12-07, jax 0.10.2 and 0.12.1).
TOL = 2e-5
TOL_GUIDED = 5e-5


class _Spectrogram:
  """torchaudio.transforms.Spectrogram(normalized=True) over torch.stft."""

  def __init__(self, n_fft, win_length, hop_length, power, center, pad,
               normalized):
    assert pad == 0 and normalized is True
    self.n_fft, self.hop, self.power, self.center = (n_fft, hop_length, power,
                                                     center)
    self.window = torch.hann_window(win_length)

  def __call__(self, x):
    spec = torch.stft(x, self.n_fft, self.hop, window=self.window,
                      center=self.center, pad_mode='reflect', normalized=False,
                      onesided=True, return_complex=True)
    return (spec / self.window.pow(2.0).sum().sqrt()).abs().pow(self.power)


def _extractor(s: musicgen_chroma.ChromaSettings):
  fe = importlib.import_module('transformers.models.musicgen_melody.'
                               'feature_extraction_musicgen_melody')
  fe.torchaudio = types.SimpleNamespace(
      transforms=types.SimpleNamespace(Spectrogram=_Spectrogram))
  return fe.MusicgenMelodyFeatureExtractor(
      sampling_rate=s.sampling_rate, n_fft=s.n_fft, hop_length=s.hop_length,
      chunk_length=s.chunk_length, num_chroma=s.num_chroma)


def chords(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
  """Random triads (a quarter second each, random phases and loudness) with
  a little noise: a melody-like signal whose strongest class moves."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(sr * seconds)) / sr
  out = np.zeros_like(t)
  seg = int(sr * 0.25)
  for i in range(0, len(t), seg):
    root = rng.integers(48, 72)
    for step in (0, 4, 7):
      f = 440.0 * 2 ** ((root + step - 69) / 12)
      out[i:i + seg] += rng.uniform(0.3, 1.0) * np.sin(
          2 * np.pi * f * t[i:i + seg] + rng.uniform(0, 6))
  return (0.2 * out + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def tiny_melody(folder: str, seed: int = 0):
  """A random MusicGen-Melody saved to `folder` with its tokenizer and
  preprocessor_config.json; norms away from 1 / 0, heads scaled and the
  projections drawn wide, so logits are a few units and mix-ups show."""
  torch.manual_seed(seed)
  t5, enc, dec = M.tiny_parts()
  config = transformers.MusicgenMelodyConfig(
      text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(),
      decoder=transformers.MusicgenMelodyDecoderConfig(**dec).to_dict(),
      num_chroma=12, chroma_length=CHROMA_LENGTH)
  model = transformers.MusicgenMelodyForConditionalGeneration(config).eval()
  M.spread(model, ('enc_to_dec_proj', 'audio_enc_to_dec_proj'), 0.5)
  model.save_pretrained(folder)
  rf.t5_tokenizer(os.path.join(folder, import_musicgen.TOKENIZER), WORDS)
  _extractor(TINY).to_json_file(
      os.path.join(folder, musicgen_chroma.PREPROCESSOR))
  return model


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('melody'))
  return path, tiny_melody(path)


@pytest.fixture(scope='module')
def ours(folder):
  with nnx.use_eager_sharding(False):
    return musicgen.load(folder[0])


@pytest.fixture(scope='module')
def imported(folder, tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp('imported') / 'run')
  assert cli.main(['import-musicgen', '--from', folder[0], '--workdir',
                   run_dir]) == 0
  return run_dir


def _text(seed=0):
  """Token ids [B, 5] and mask; row 1 is shorter."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, T5_VOCAB, size=(B, 5))
  mask = np.ones((B, 5), np.int64)
  mask[1, 3:] = 0
  return ids, mask


def _chroma(frames, seed=0):
  rng = np.random.default_rng(seed)
  return np.eye(12, dtype=np.float32)[rng.integers(0, 12, size=(B, frames))]


@pytest.mark.parametrize('settings, seconds', [
    (TINY, 1.3), (TINY, 3.0), (TINY, 0.05),      # cut to 2 s; under n_fft
    (musicgen_chroma.ChromaSettings(), 8.0)])     # MusicGen-Melody's own
def test_chroma_equals_the_feature_extractor(settings, seconds):
  """Our chroma one-hots are the extractor's exactly on a chord sequence
  (no near-ties between the two strongest classes in these signals)."""
  wave = chords(settings.sampling_rate, seconds)
  want = _extractor(settings)(wave, sampling_rate=settings.sampling_rate,
                              return_tensors='np')['input_features'][0]
  got = musicgen_chroma.chroma(wave, settings)
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)
  if seconds > 1:    # the melody moves between classes
    assert len(set(want.argmax(-1).tolist())) >= 5


def test_config_is_read_from_the_folder(ours):
  m = ours[1].model
  assert (m.conditioning, m.chroma_bins, m.chroma_length) == (
      'prefix', 12, CHROMA_LENGTH)
  assert m.chroma_proj and m.context_proj and m.text_encoder == 't5'
  assert not m.backbone.cross_attention and not m.end_token
  assert not hasattr(ours[0].backbone.layers, 'cross')


def _batch(codes, ids, mask, chroma=None):
  b, _, steps = codes.shape
  batch = dict(text=jnp.full((b, steps), -1),
               audio=jnp.asarray(np.moveaxis(codes, 1, 2)),
               melody=jnp.full((b, steps), -1),
               positions=jnp.broadcast_to(jnp.arange(steps), (b, steps)),
               valid=jnp.ones((b, steps), bool),
               context_tokens=jnp.asarray(ids),
               context_valid=jnp.asarray(mask.astype(bool)))
  if chroma is not None:
    batch['chroma'] = jnp.asarray(chroma)
  return batch


@pytest.mark.parametrize('frames', [None, 3, 11])   # none, tiled, cut
def test_teacher_forced_logits_equal_transformers(folder, ours, frames):
  ref, model = folder[1], ours[0]
  rng = np.random.default_rng(1)
  codes = rng.integers(0, V + 1, size=(B, K, L))
  codes[:, :, 0] = V
  ids, mask = _text()
  chroma = None if frames is None else _chroma(frames)
  kw = {} if chroma is None else {'input_features': torch.tensor(chroma)}
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              decoder_input_ids=torch.tensor(codes.reshape(B * K, L)), **kw)
  # transformers returns the prefix's positions too: the audio's are last.
  want = out.logits.numpy().reshape(B, K, -1, V)[:, :, -L:]
  assert out.logits.shape[1] == CHROMA_LENGTH + ids.shape[1] + L
  got = np.moveaxis(np.asarray(model(_batch(codes, ids, mask, chroma))
                               ['stream']), 2, 1)
  err = float(np.abs(got - want).max())
  print(f'chroma frames {frames}: teacher-forced max abs error {err}, peak '
        f'{np.abs(want).max()}')
  assert np.abs(want).max() > 1.0 and err < TOL, err


def test_training_loss_equals_transformers(folder, ours):
  """The loss (audio slots only, pad targets ignored, codebooks averaged) is
  transformers' loss with the same steps as labels."""
  from musicjax.lm import model as model_lib
  model = ours[0]
  steps = 8
  rng = np.random.default_rng(4)
  labels = rng.integers(0, V, size=(B, steps, K))
  for k in range(K):           # the delay pattern's empty slots: pad
    labels[:, :k, k] = V
  dec_in = np.concatenate([np.full((B, 1, K), V), labels[:, :-1]], 1)
  ids, mask = _text(4)
  chroma = _chroma(5, seed=4)
  batch = _batch(np.moveaxis(np.concatenate([dec_in, labels[:, -1:]], 1), 2, 1),
                 ids, mask, chroma)
  loss, _ = model_lib.loss_and_metrics(model, batch, 1.0, 'mean')
  with torch.no_grad():
    want = folder[1](input_ids=torch.tensor(ids),
                     attention_mask=torch.tensor(mask),
                     input_features=torch.tensor(chroma),
                     decoder_input_ids=torch.tensor(
                         np.moveaxis(dec_in, 2, 1).reshape(B * K, steps)),
                     labels=torch.tensor(labels)).loss.item()
  print('training loss', float(loss), 'transformers', want)
  assert abs(float(loss) - want) < 1e-5 * max(1.0, abs(want))


@pytest.mark.parametrize('inputs, cfg', [('text+melody', 1.0),
                                         ('text+melody', 3.0),
                                         ('melody', 3.0), ('text', 3.0)])
def test_greedy_decode_equals_transformers_generate(folder, ours, inputs, cfg):
  """transformers' generate (greedy, guidance with the null chroma and zero
  text states, the prefix in its cache) vs ours: the same codes and guided
  logits at every step. 'melody': no input_ids (transformers encodes one
  masked BOS); 'text': no input_features (the null chroma)."""
  ref, (model, c) = folder[1], ours
  frames = 12
  ids, mask = _text(2)
  chroma = _chroma(5, seed=2)
  seen = {}

  class Decoded:
    audio_values = torch.zeros(B, 1, 8)

  def keep(codes, *args, **kwargs):
    seen['codes'] = codes.clone()
    return Decoded()

  ref.audio_encoder.decode = keep
  kw = {}
  if 'text' in inputs:
    kw.update(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if 'melody' in inputs:
    kw['input_features'] = torch.tensor(chroma)
  with torch.no_grad():
    out = ref.generate(**kw, do_sample=False, guidance_scale=cfg,
                       max_new_tokens=frames + K - 1, output_scores=True,
                       return_dict_in_generate=True)
  want = np.moveaxis(seen['codes'][0].numpy(), 1, 2)
  scores = np.stack([s.numpy().reshape(B, K, V) for s in out.scores], 1)
  tokens = (np.where(mask > 0, ids, -1) if 'text' in inputs
            else np.full((B, 1), -1))
  p = musicgen_song.prompt(c.model, tokens, cfg=cfg != 1.0,
                           chroma=chroma if 'melody' in inputs else None)
  s = gen.Sampling(temperature=0.0, cfg_scale=cfg, max_frames=frames, top_k=0)
  run = jax.jit(lambda p, r: gen.generate(model, p, rng=r, sampling=s,
                                          num_cond=B, record_logits=True))
  got = run({k: jnp.asarray(v) for k, v in p.items()}, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(got['codes']), want)
  lg = np.asarray(got['logits_stream'])[:, :scores.shape[1]]
  err = float(np.abs(lg - scores).max())
  print(f'{inputs} cfg {cfg}: guided logits max abs error {err}')
  assert err < TOL_GUIDED, err
  if inputs == 'text+melody':   # the melody steers the logits
    p2 = dict(p, chroma=np.roll(p['chroma'], 1, axis=-1))
    other = run({k: jnp.asarray(v) for k, v in p2.items()}, jax.random.key(0))
    moved = float(np.abs(np.asarray(other['logits_stream'])[:, :lg.shape[1]]
                         - lg).max())
    print('another melody moves the guided logits by', moved)
    assert moved > 0.05, moved    # measured 0.115 at scale 1


def test_export_round_trips_to_transformers(folder, imported, tmp_path):
  """import-musicgen -> export-musicgen of the untouched run: the very same
  tensors and files, and MusicgenMelodyForConditionalGeneration loads it."""
  out = str(tmp_path / 'out')
  assert cli.main(['export-musicgen', '--workdir', imported, '--out', out]) == 0
  want = load_file(os.path.join(folder[0], 'model.safetensors'))
  got = load_file(os.path.join(out, 'model.safetensors'))
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for name in ('config.json', 'generation_config.json', 'tokenizer.json',
               musicgen_chroma.PREPROCESSOR):
    assert open(os.path.join(out, name)).read() == open(
        os.path.join(folder[0], name)).read(), name
  back = transformers.MusicgenMelodyForConditionalGeneration.from_pretrained(out)
  assert back.config.chroma_length == CHROMA_LENGTH
  theirs = back.state_dict()
  for name in want:      # loaded as written (no tensor re-initialised)
    np.testing.assert_array_equal(theirs[name].numpy(), want[name],
                                  err_msg=name)


def test_generate_cli_follows_the_melody_wav(folder, imported, tmp_path):
  """`generate --text --melody song.wav`: the wav's chroma (the run's
  preprocessor_config.json) and the description give transformers' greedy
  codes for the processor's inputs; a melody alone works too."""
  wav = str(tmp_path / 'melody.wav')
  sf.write(wav, chords(SR, 1.0, seed=7), SR, subtype='FLOAT')
  frames, text = 10, 'calm piano jazz'
  ref = folder[1]
  seen = {}

  class Decoded:
    audio_values = torch.zeros(1, 1, 8)

  def keep(codes, *args, **kwargs):
    seen['codes'] = codes.clone()
    return Decoded()

  ref.audio_encoder.decode = keep
  feats = _extractor(TINY)(sf.read(wav, dtype='float32')[0], sampling_rate=SR,
                           return_tensors='pt')['input_features']
  ids = musicgen_song.text_tokens(os.path.join(imported, 'released',
                                               import_musicgen.TOKENIZER), text)
  for given in (['--text', text], []):
    out = str(tmp_path / f'song{len(given)}.wav')
    assert cli.main(['generate', '--workdir', imported, *given, '--melody',
                     wav, '--seconds', str(frames * HOP / SR), '--out',
                     out]) == 0
    codes = np.load(out[:-4] + '.npz')['codes']
    assert len(sf.read(out)[0]) == frames * HOP
    kw = {'input_ids': torch.tensor(ids)} if given else {}
    with torch.no_grad():
      ref.generate(**kw, input_features=feats, do_sample=False,
                   max_new_tokens=frames + K - 1)
    np.testing.assert_array_equal(codes, seen['codes'][0, 0].numpy().T)


def test_generate_errors_name_the_fix(folder, imported, tmp_path, capsys):
  # --melody on a MusicGen without one names the melody import.
  d = json.load(open(os.path.join(folder[0], 'config.json')))
  plain = musicgen.config_from(dict(d, model_type='musicgen'))
  with pytest.raises(Exception, match='musicgen_melody'):
    musicgen_song.check_request(song.SongRequest(melody_path='x.wav'), plain)
  # An unreadable wav is named.
  bad = tmp_path / 'bad.wav'
  bad.write_bytes(b'not a wav at all')
  out = str(tmp_path / 'song.wav')
  capsys.readouterr()
  assert cli.main(['generate', '--workdir', imported, '--melody', str(bad),
                   '--seconds', '0.02', '--out', out]) == 2
  assert str(bad) in capsys.readouterr().err
  assert not os.path.exists(out)


def test_bad_folders_are_named(folder, tmp_path, capsys):
  t = rf.tensors(folder[0])
  t.pop('audio_enc_to_dec_proj.weight')
  bad = rf.copy(folder[0], str(tmp_path / 'missing'), tensors=t)
  err = rf.fails(capsys, 'import-musicgen', bad, str(tmp_path / 'run'),
                 'model.safetensors')
  assert re.search(r"tensor 'audio_enc_to_dec_proj\.weight' is missing", err)
  # A preprocessor_config.json of another chroma size.
  other = str(tmp_path / 'chroma')
  shutil.copytree(folder[0], other)
  path = os.path.join(other, musicgen_chroma.PREPROCESSOR)
  d = json.load(open(path))
  d.update(num_chroma=24, feature_size=24)
  json.dump(d, open(path, 'w'))
  err = rf.fails(capsys, 'import-musicgen', other, str(tmp_path / 'run2'),
                 musicgen_chroma.PREPROCESSOR, 'num_chroma is 24')
