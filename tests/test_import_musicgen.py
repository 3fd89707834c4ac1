"""MusicGen in transformers' layout (MusicgenForConditionalGeneration
.save_pretrained: config.json + model.safetensors + generation_config.json,
with a T5 tokenizer.json) -> our single_stream AudioLM with its T5 encoder:
the same teacher-forced logits as transformers, the same greedy codes and
guided logits under classifier-free guidance over the delay pattern,
`musicjax import-musicgen` -> a normal LM run, and bad input named. The
models are tiny random MusicGens built here (no network)."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from musicjax import cli
from musicjax.export import import_musicgen
from musicjax.export.released import musicgen
from musicjax.lm import generate as gen
from musicjax.lm import musicgen_song
from musicjax.train import runs

import released_fixtures as rf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

B, K, V, L = 2, 4, 16, 9
SR, HOP = 8000, 16
T5_VOCAB = 40
WORDS = ('calm', 'piano', 'loud', 'drums', 'slow', 'jazz', 'bright', 'synth')
# float32 on both sides, logits peaking near 11 (heads scaled up): the gap is
# summation order; measured 2.9e-6 teacher-forced and 3.8e-6 guided at scale
# 1, 1.3e-5 at scale 3, which multiplies the cond/uncond gaps by up to
# 2 * 3 + 1 (2026-12-07, jax 0.12.1).
TOL = 2e-5
TOL_GUIDED = 5e-5


def tiny_parts() -> tuple:
  """(T5 config, EnCodec config, decoder numbers) of the tiny MusicGens,
  text and melody alike."""
  t5 = transformers.T5Config(
      vocab_size=T5_VOCAB, d_model=24, d_kv=8, d_ff=32, num_layers=2,
      num_heads=3, relative_attention_num_buckets=8,
      relative_attention_max_distance=16, feed_forward_proj='relu')
  # 8 kHz, hop 16: 500 frames/s of 4-bit codes,
  # so 8 kbps is K = 4 codebooks.
  enc = transformers.EncodecConfig(
      sampling_rate=SR, audio_channels=1, num_filters=4,
      upsampling_ratios=[4, 4], codebook_size=V, codebook_dim=8,
      hidden_size=8, num_lstm_layers=1, target_bandwidths=[8.0],
      use_causal_conv=False, norm_type='weight_norm', normalize=False)
  dec = dict(vocab_size=V, max_position_embeddings=64, num_hidden_layers=2,
             ffn_dim=48, num_attention_heads=4, hidden_size=32,
             num_codebooks=K, pad_token_id=V, bos_token_id=V, dropout=0.0)
  return t5, enc, dec


def spread(model, projections=('enc_to_dec_proj',), std: float = 0.3) -> None:
  """Norms away from 1 / 0, heads scaled and the `projections` drawn wide,
  so logits are a few units and a mapping mix-up shows; EnCodec's codebooks
  drawn."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'layer_norm' in name and not name.startswith('text_encoder'):
        p.uniform_(0.5, 1.5) if name.endswith('weight') else p.uniform_(-.5, .5)
      elif 'lm_heads' in name:
        p.mul_(30.0)
      elif name.startswith(tuple(projections)):
        p.normal_(0.0, std)
    for name, buf in model.audio_encoder.named_buffers():
      if name.endswith('.embed'):
        buf.normal_()
      elif name.endswith('.inited'):
        buf.fill_(1.0)


def tiny_musicgen(folder: str, seed: int = 0, **decoder):
  """A random MusicGen saved to `folder` (`spread`) with its tokenizer."""
  torch.manual_seed(seed)
  t5, enc, dec = tiny_parts()
  dec.update(decoder)
  config = transformers.MusicgenConfig(
      text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(),
      decoder=transformers.MusicgenDecoderConfig(**dec).to_dict())
  model = transformers.MusicgenForConditionalGeneration(config).eval()
  spread(model)
  model.save_pretrained(folder)
  rf.t5_tokenizer(os.path.join(folder, import_musicgen.TOKENIZER), WORDS)
  return model


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('musicgen'))
  return path, tiny_musicgen(path)


@pytest.fixture(scope='module')
def imported(folder, tmp_path_factory):
  """The run `import-musicgen` writes (tests that change it copy it)."""
  run_dir = str(tmp_path_factory.mktemp('imported') / 'run')
  assert cli.main(['import-musicgen', '--from', folder[0], '--workdir',
                   run_dir]) == 0
  return run_dir


@pytest.fixture(scope='module')
def ours(folder):
  with nnx.use_eager_sharding(False):
    return musicgen.load(folder[0])


def _text(seed=0):
  """Token ids [B, 5] and mask; row 1 is shorter."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, T5_VOCAB, size=(B, 5))
  mask = np.ones((B, 5), np.int64)
  mask[1, 3:] = 0
  return ids, mask


def test_config_is_read_from_the_folder(folder, ours):
  _, c = ours
  m = c.model
  assert (m.variant, m.pattern, m.num_codebooks, m.codebook_size) == (
      'single_stream', 'delay', K, V)
  assert not m.end_token and m.text_encoder == 't5' and m.context_proj
  b = m.backbone
  assert (b.num_layers, b.dim, b.num_heads, b.mlp_dim) == (2, 32, 4, 48)
  assert (b.norm, b.mlp, b.positions, b.cross_attention) == (
      'layer', 'gelu', 'sinusoidal', True)
  assert (m.t5.dim, m.t5.num_layers, m.t5.relative_buckets) == (24, 2, 8)
  # save_pretrained's generation_config.json has no do_sample: greedy.
  assert c.sample.temperature == 0.0 and c.sample.cfg_scale == 1.0


def test_teacher_forced_logits_equal_transformers(folder, ours):
  ref, model = folder[1], ours[0]
  rng = np.random.default_rng(1)
  codes = rng.integers(0, V + 1, size=(B, K, L))
  codes[:, :, 0] = V                                 # the start slot
  ids, mask = _text()
  mask[0] = 0                                        # row 0: no text (CFG null)
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               decoder_input_ids=torch.tensor(codes.reshape(B * K, L))
               ).logits.numpy().reshape(B, K, L, V)
  batch = dict(text=jnp.full((B, L), -1), audio=jnp.asarray(np.moveaxis(codes, 1, 2)),
               melody=jnp.full((B, L), -1),
               positions=jnp.broadcast_to(jnp.arange(L), (B, L)),
               valid=jnp.ones((B, L), bool), context_tokens=jnp.asarray(ids),
               context_valid=jnp.asarray(mask.astype(bool)))
  got = np.moveaxis(np.asarray(model(batch)['stream']), 2, 1)
  err = float(np.abs(got - want).max())
  print('teacher-forced logits: max abs error', err, 'peak', np.abs(want).max())
  assert np.abs(want).max() > 1.0
  assert err < TOL, err


@pytest.mark.parametrize('cfg', [1.0, 3.0])
def test_greedy_decode_equals_transformers_generate(folder, ours, cfg):
  """transformers' generate (greedy, guidance on the logits, its delay
  pattern and pad handling) vs ours: the same codes, the same guided logits
  at every step."""
  ref, model = folder[1], ours[0]
  frames = 12
  ids, mask = _text(2)
  seen = {}

  class Decoded:   # stands in for EnCodec's decode: we compare codes
    audio_values = torch.zeros(B, 1, 8)

  def keep(codes, *args, **kwargs):
    seen['codes'] = codes.clone()
    return Decoded()

  ref.audio_encoder.decode = keep
  with torch.no_grad():
    out = ref.generate(input_ids=torch.tensor(ids),
                       attention_mask=torch.tensor(mask), do_sample=False,
                       guidance_scale=cfg, max_new_tokens=frames + K - 1,
                       output_scores=True, return_dict_in_generate=True)
  want = np.moveaxis(seen['codes'][0].numpy(), 1, 2)          # [B, T, K]
  scores = np.stack([s.numpy().reshape(B, K, V) for s in out.scores], 1)
  s = gen.Sampling(temperature=0.0, cfg_scale=cfg, max_frames=frames, top_k=0)
  p = musicgen_song.prompt(ours[1].model, np.where(mask > 0, ids, -1),
                           cfg=cfg != 1.0)
  run = jax.jit(lambda p, r: gen.generate(model, p, rng=r, sampling=s,
                                          num_cond=B, record_logits=True))
  got = run({k: jnp.asarray(v) for k, v in p.items()}, jax.random.key(0))
  assert np.asarray(got['num_frames']).tolist() == [frames] * B
  np.testing.assert_array_equal(np.asarray(got['codes']), want)
  lg = np.asarray(got['logits_stream'])[:, :scores.shape[1]]
  err = float(np.abs(lg - scores).max())
  print(f'cfg {cfg}: guided logits max abs error {err}')
  assert err < TOL_GUIDED, err
  # The text steers the codes: another description gives others.
  p2 = musicgen_song.prompt(ours[1].model, ids[::-1], cfg=cfg != 1.0)
  other = run({k: jnp.asarray(v) for k, v in p2.items()}, jax.random.key(0))
  assert not np.array_equal(np.asarray(other['codes']), want)


def test_training_loss_equals_transformers(folder, ours):
  """A training window as our pipeline builds it (the start slot, the delay
  pattern's steps with the pad id in empty slots, the description as the
  context, one row's text dropped) gives transformers' own loss with those
  steps as labels: the mean over codebooks of each codebook's cross-entropy
  on non-pad tokens (loss.local_weighting 'mean')."""
  from musicjax.lm import data as lm_data
  from musicjax.lm import model as model_lib
  from musicjax.lm import sequence
  model, c = ours
  frames = 7
  rng = np.random.default_rng(4)
  ids, mask = _text(4)
  rows, labels = [], []
  for b in range(B):
    codes = rng.integers(0, V, size=(frames, K)).astype(np.int32)
    part = lm_data.audio_slots(c, codes, np.full(frames, -1, np.int32), False)
    ex = sequence.assemble([part], frames + K, K, V)
    keep = b == 0
    ex.update(lm_data.context(c, ids[b][mask[b] > 0], keep=keep))
    rows.append(ex)
    labels.append(part.codes[1:])                  # the steps after the start
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  assert int(batch['audio'][0, 0, 0]) == V         # the start slot: pad ids
  loss, metrics = model_lib.loss_and_metrics(model, batch, 1.0, 'mean')
  tmask = np.asarray(batch['context_valid']).astype(np.int64)
  # transformers shifts the labels right behind the start (pad) id: our
  # window without its last step.
  steps = frames + K - 1
  dec_in = np.moveaxis(np.asarray(batch['audio'])[:, :steps], 2, 1).reshape(
      B * K, steps).astype(np.int64)
  with torch.no_grad():
    want = folder[1](input_ids=torch.tensor(np.asarray(batch['context_tokens'],
                                                       np.int64)),
                     attention_mask=torch.tensor(tmask),
                     decoder_input_ids=torch.tensor(dec_in),
                     labels=torch.tensor(np.stack(labels).astype(np.int64))
                     ).loss.item()
  print('training loss', float(loss), 'transformers', want)
  assert abs(float(loss) - want) < 1e-5 * max(1.0, abs(want))


def test_token_windows_carry_the_description_as_t5_tokens(imported):
  """A prepared song (codes + tags) as the MusicGen run's training window:
  the start slot, the delay-pattern steps with the pad id in empty slots (no
  END), and the tags as a plain description in the copied T5 tokenizer's
  ids; with the tags dropped (guidance), no valid text."""
  from musicjax.lm import token_data
  c = runs.saved_config(imported, 'lm')
  c.cond.drop_tags = 0.0
  c.cond.drop_all = 0.0
  frames = 10
  rng = np.random.default_rng(5)
  codes = rng.integers(0, V, size=(frames, K)).astype(np.int32)
  record = {'name': 'song', 'codes': codes,
            'meta': {'tags': 'genre: jazz; mood: calm'}}
  ex = token_data.Example(c, frame_rate=50.0, train=False)(
      record, np.random.default_rng(0))
  audio = ex['audio']
  assert (audio[0] == V).all()                    # the start slot
  for k in range(K):                              # codebook k delayed by k
    np.testing.assert_array_equal(audio[1 + k:1 + k + frames, k], codes[:, k])
    assert (audio[1:1 + k, k] == V).all()
  assert int(ex['valid'].sum()) == 1 + frames + K - 1
  assert (ex['audio'][ex['valid']] != -1).all()
  tok = musicgen_song.load_tokenizer(c.data.tokenizer)
  want = tok.encode('genre: jazz; mood: calm').ids
  n = len(want)
  assert ex['context_tokens'][:n].tolist() == want and ex['context_valid'][:n].all()
  assert not ex['context_valid'][n:].any()
  c.cond.drop_tags = 1.0
  dropped = token_data.Example(c, frame_rate=50.0, train=True)(
      record, np.random.default_rng(0))
  assert not dropped['context_valid'].any()


def test_train_fine_tunes_the_imported_run_with_t5_frozen(imported, tmp_path):
  """`musicjax train` on the imported run (synthetic Markov songs, no text):
  the loss falls, the decoder moves, T5 stays as released (frozen, as
  MusicGen trains) and the EnCodec run is untouched."""
  import shutil
  from musicjax.train import metrics as metrics_lib
  run_dir = str(tmp_path / 'run')
  shutil.copytree(imported, run_dir)
  before = runs.load_run(run_dir, expect='lm').model
  assert cli.main(['train', '--workdir', run_dir,
                   '--config.data.kind=synthetic',
                   '--config.data.markov_noise=(1,1,1)',
                   '--config.data.max_frames=24', '--config.optim.lr=3e-3',
                   '--config.optim.warmup_steps=5', '--config.train.steps=60',
                   '--config.train.log_every=10',
                   '--config.train.checkpoint_every=60',
                   '--config.train.eval_every=1000']) == 0
  logged = [r['loss'] for r in metrics_lib.read_jsonl(
      os.path.join(run_dir, 'metrics.jsonl')) if 'loss' in r]
  assert logged[-1] < 0.7 * logged[0], logged
  after = runs.load_run(run_dir, expect='lm').model
  from musicjax.export.released.mapping import path_key
  flat = lambda m: {path_key(k): np.asarray(v) for k, v in
                    jax.tree_util.tree_leaves_with_path(
                        nnx.to_pure_dict(nnx.state(m, nnx.Param)))}
  b, a = flat(before), flat(after)
  assert any(key.startswith('text_encoder/') for key in b)
  for key in b:
    if key.startswith('text_encoder/'):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert not np.array_equal(a['heads'], b['heads'])


def test_import_cli_writes_a_run_with_the_same_model(folder, ours, imported):
  run_dir = imported
  with open(os.path.join(run_dir, 'released', import_musicgen.RECORD)) as f:
    record = json.load(f)
  assert record['musicgen'] == os.path.abspath(folder[0])
  tok = os.path.join(run_dir, record['tokenizer'])
  assert musicgen_song.is_released(run_dir)
  run = runs.load_run(run_dir, expect='lm')
  assert os.path.isdir(os.path.join(run_dir, import_musicgen.CODEC))
  # Sampling keys may be overridden; the model's may not (below).
  assert import_musicgen.run_config(
      folder[0], ['--config.sample.top_k=250']).sample.top_k == 250
  want = nnx.to_pure_dict(nnx.state(ours[0]))
  got = nnx.to_pure_dict(nnx.state(run.model))
  flat = lambda d: {'/'.join(map(str, k)): np.asarray(v) for k, v in
                    jax.tree_util.tree_leaves_with_path(d)}
  want, got = flat(want), flat(got)
  assert sorted(want) == sorted(got)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # The copied tokenizer gives the processor's ids ('</s>' appended).
  ids = musicgen_song.text_tokens(tok, 'calm piano jazz')
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=tok)
  assert ids.tolist() == [fast('calm piano jazz')['input_ids']]
  assert ids[0, -1] == 1


def test_generate_cli_writes_the_greedy_song(folder, imported, tmp_path):
  """`generate --text` on the imported run: the description through the
  copied tokenizer, greedy as generation_config.json says, decoded by the
  imported EnCodec (RUN/codec): the codes and the waveform of transformers'
  generate() of the same ids."""
  import soundfile as sf
  run_dir = imported
  frames, text = 10, 'calm piano jazz'
  out = str(tmp_path / 'song.wav')
  assert cli.main(['generate', '--workdir', run_dir, '--text', text,
                   '--seconds', str(frames * HOP / SR), '--out', out]) == 0
  codes = np.load(str(tmp_path / 'song.npz'))['codes']
  wave, sr = sf.read(out, dtype='float32')
  assert sr == SR and len(wave) == frames * HOP
  ref = transformers.MusicgenForConditionalGeneration.from_pretrained(folder[0])
  ids = musicgen_song.text_tokens(os.path.join(run_dir, 'released',
                                               import_musicgen.TOKENIZER), text)
  seen = {}
  decode = ref.audio_encoder.decode

  def keep(codes, *args, **kwargs):
    seen['codes'] = codes.clone()
    return decode(codes, *args, **kwargs)

  ref.audio_encoder.decode = keep
  with torch.no_grad():
    audio = ref.generate(input_ids=torch.tensor(ids), do_sample=False,
                         max_new_tokens=frames + K - 1)
  np.testing.assert_array_equal(codes, seen['codes'][0, 0].numpy().T)
  want = np.clip(audio[0, 0].numpy(), -1, 1)      # the wav is clipped
  err = float(np.abs(wave - want).max())
  print('generated waveform: max abs error', err, 'peak', np.abs(want).max())
  # 16-bit PCM rounding (1.5e-5) + float32 decode order.
  assert np.abs(want).max() > 0.05 and err < 1e-4, err


def test_generate_needs_a_codec_and_refuses_lyrics(imported, tmp_path, capsys):
  import shutil
  run_dir = str(tmp_path / 'run')
  shutil.copytree(imported, run_dir)
  shutil.rmtree(os.path.join(run_dir, import_musicgen.CODEC))
  capsys.readouterr()
  out = str(tmp_path / 'song.wav')
  assert cli.main(['generate', '--workdir', run_dir, '--text', 'calm piano',
                   '--seconds', '0.02', '--out', out]) == 2
  assert '--codec-workdir' in capsys.readouterr().err
  lyrics = tmp_path / 'lyrics.txt'
  lyrics.write_text('[verse]\nla la\n')
  assert cli.main(['generate', '--workdir', run_dir, '--lyrics', str(lyrics),
                   '--out', out]) == 2
  assert '--text' in capsys.readouterr().err
  # --melody on a MusicGen without one: refused from its config, before the
  # run is opened (its missing codec would be the error otherwise).
  assert cli.main(['generate', '--workdir', run_dir, '--text', 'calm piano',
                   '--melody', str(lyrics), '--out', out]) == 2
  assert 'has no melody input' in capsys.readouterr().err
  assert not os.path.exists(out)


def test_export_round_trips_to_transformers(folder, imported, tmp_path):
  """import-musicgen -> export-musicgen of the untouched run: the very same
  tensors (LM, T5 and EnCodec), and the folder loads in transformers."""
  run_dir, out = imported, str(tmp_path / 'out')
  assert cli.main(['export-musicgen', '--workdir', run_dir, '--out', out]) == 0
  want = load_file(os.path.join(folder[0], 'model.safetensors'))
  got = load_file(os.path.join(out, 'model.safetensors'))
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for name in ('config.json', 'generation_config.json', 'tokenizer.json'):
    assert open(os.path.join(out, name)).read() == open(
        os.path.join(folder[0], name)).read(), name
  back = transformers.MusicgenForConditionalGeneration.from_pretrained(out)
  assert back.config.decoder.num_codebooks == K
  ids, mask = _text(3)
  with torch.no_grad():
    args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                do_sample=False, guidance_scale=3.0, max_new_tokens=8)
    orig = transformers.MusicgenForConditionalGeneration.from_pretrained(
        folder[0])
    np.testing.assert_array_equal(back.generate(**args).numpy(),
                                  orig.generate(**args).numpy())


def test_export_refuses_runs_it_cannot_write(imported, tmp_path, capsys):
  import shutil
  run_dir = str(tmp_path / 'run')
  shutil.copytree(imported, run_dir)
  os.remove(os.path.join(run_dir, 'released', 'config.json'))
  out = str(tmp_path / 'out')
  assert cli.main(['export-musicgen', '--workdir', run_dir, '--out', out]) == 2
  assert 'import-musicgen' in capsys.readouterr().err
  assert not os.path.exists(os.path.join(out, 'model.safetensors'))


@pytest.mark.parametrize('name, edit, message', [
    ('missing', lambda t: t.pop('decoder.lm_heads.2.weight'),
     r"tensor 'decoder\.lm_heads\.2\.weight' is missing"),
    ('shape', lambda t: t.update({'enc_to_dec_proj.bias': np.zeros(7, np.float32)}),
     r"tensor 'enc_to_dec_proj\.bias' has shape \(7,\)"),
    ('extra', lambda t: t.update({'decoder.model.decoder.extra': np.zeros(3, np.float32)}),
     r'decoder\.model\.decoder\.extra'),
])
def test_bad_weights_are_named_and_leave_no_run(folder, tmp_path, capsys, name,
                                                edit, message):
  t = rf.tensors(folder[0])
  edit(t)
  bad = rf.copy(folder[0], str(tmp_path / name), tensors=t)
  err = rf.fails(capsys, 'import-musicgen', bad, str(tmp_path / 'run'),
                 'model.safetensors')
  assert re.search(message, err), err


def test_bad_folders_are_named(folder, tmp_path, capsys):
  import shutil
  cases = {}
  # Another model type.
  other = str(tmp_path / 'other')
  shutil.copytree(folder[0], other)
  path = os.path.join(other, 'config.json')
  d = json.load(open(path))
  d['model_type'] = 'encodec'
  json.dump(d, open(path, 'w'))
  cases[other] = r"model_type is 'encodec', not 'musicgen'"
  # Stereo.
  stereo = str(tmp_path / 'stereo')
  shutil.copytree(folder[0], stereo)
  path = os.path.join(stereo, 'config.json')
  d = json.load(open(path))
  d['decoder']['audio_channels'] = 2
  json.dump(d, open(path, 'w'))
  cases[stereo] = r'decoder\.audio_channels is 2.*stereo'
  # A truncated weights file.
  cut = str(tmp_path / 'cut')
  shutil.copytree(folder[0], cut)
  path = os.path.join(cut, 'model.safetensors')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  cases[cut] = r'model\.safetensors'
  for src, message in cases.items():
    run_dir = str(tmp_path / ('run-' + os.path.basename(src)))
    assert cli.main(['import-musicgen', '--from', src, '--workdir',
                     run_dir]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), (src, err)
    assert not os.path.exists(run_dir)
  # An override that would change the network.
  run_dir = str(tmp_path / 'run-override')
  assert cli.main(['import-musicgen', '--from', folder[0], '--workdir', run_dir,
                   '--config.model.backbone.num_layers=3']) == 2
  assert 'config.model' in capsys.readouterr().err
  assert not os.path.exists(run_dir)
