"""DPO (musicjax/lm/dpo.py, dpo_pairs.py) and preference pairs (lm/prefs.py)
on tiny random LMs: the loss against a hand computation, a few optimizer
steps, the trainer's warm start from an LM run, the pair readers' errors, and
scoring."""
import copy
import glob
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm_fixtures as F
from musicjax import config as config_lib
from musicjax.config import ConfigError
from musicjax.data import text as text_lib
from musicjax.errors import UserError
from musicjax.lm import conditions
from musicjax.lm import dpo
from musicjax.lm import dpo_pairs
from musicjax.lm import layout
from musicjax.lm import model as model_lib
from musicjax.lm import prefs
from musicjax.lm import sequence
from musicjax.parallel import mesh as mesh_lib
from musicjax.parallel import rules as rules_lib
from musicjax.train import metrics as metrics_lib
from musicjax.train import runs
from musicjax.train import trainer

BETA = 0.1
# The tokenizer needs MIN_VOCAB_SIZE ids; a few merges on top.
TOKENIZER_VOCAB = text_lib.MIN_VOCAB_SIZE + 8
TAGS = 'genre: chorale; mood: bright'
LYRICS = '[verse]\nla la la'


def _copy_into(dst, src):
  for k, v in src.items():
    if isinstance(v, config_lib.ConfigDict):
      _copy_into(dst[k], v)
    else:
      dst[k] = v


def _config(task: str, tokenizer: str = '', **dpo_keys):
  """F.small_config's model and data for `task`, one layer per stack."""
  c = config_lib.for_task(task)
  small = F.small_config()
  _copy_into(c.model, small.model)
  _copy_into(c.data, small.data)
  c.model.text_vocab_size = TOKENIZER_VOCAB + 8
  c.model.backbone.num_layers = c.model.local.num_layers = 1
  c.data.max_text_tokens = 12
  c.data.tokenizer = tokenizer
  for k, v in dpo_keys.items():
    c.dpo[k] = v
  return c


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.json')
  text_lib.TextTokenizer.train([TAGS, LYRICS] * 4, TOKENIZER_VOCAB, path)
  return path


def _sequences(c, rng, prompt, n, end):
  codes = F.frames(c, n, rng)
  return sequence.assemble(
      [sequence.TextPart(prompt),
       sequence.AudioPart(codes, F.melody(n, rng), end)],
      layout.seq_len(c), c.model.num_codebooks, c.model.codebook_size)


def _pair_batch(c, seed=0, lengths=((5, 9), (12, 3))):
  """Hand-built batch: pair i has a winner of lengths[i][0] frames (ending in
  END) and a loser of lengths[i][1] frames (cut, no END), one prompt each."""
  rng = np.random.default_rng(seed)
  rows = []
  for nw, nl in lengths:
    prompt = F.text_ids(c, 4, rng) + [F.audio_id(c)]
    w = _sequences(c, rng, prompt, nw, True)
    l = _sequences(c, rng, prompt, nl, False)
    rows.append({**{f'winner/{k}': w[k] for k in dpo_pairs.SEQ_KEYS},
                 **{f'loser/{k}': l[k] for k in dpo_pairs.SEQ_KEYS}})
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


# Jitted once per model config (eager dispatch of a forward pass is slow).
# The local transformer on at most F.small_config's max_frames slots, as the
# task runs it; _sums below runs it on every slot.
_pair_log_probs = nnx.jit(
    lambda m, b: dpo.pair_log_probs(m, b, F.small_config().data.max_frames))


@nnx.jit
def _token_log_probs(model, b):
  g, l, _, _ = model_lib.token_log_probs(model, b, model(b))
  return g, l


def _sums(model, batch, side):
  """Global and local log p of one side, computed on its own."""
  b = {k: batch[f'{side}/{k}'] for k in dpo_pairs.SEQ_KEYS}
  g, l = _token_log_probs(model, b)
  return np.asarray(g, np.float64).sum(-1), np.asarray(l, np.float64).sum(-1)


def _pure(tree):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(tree))


def _tree_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


# --------------------------------------------------------------------- loss


def test_loss_and_its_global_local_split_match_a_hand_computation():
  c = _config('lm_dpo')
  pol, ref = F.make_model(c, seed=0), F.make_model(c, seed=1)
  batch = _pair_batch(c)
  got_pol, got_ref = _pair_log_probs(pol, batch), _pair_log_probs(ref, batch)
  # The stacked forward pass gives what each side gives on its own.
  pw, pl = _sums(pol, batch, 'winner'), _sums(pol, batch, 'loser')
  rw, rl = _sums(ref, batch, 'winner'), _sums(ref, batch, 'loser')
  np.testing.assert_allclose(got_pol.winner_global, pw[0], rtol=1e-5)
  np.testing.assert_allclose(got_pol.loser_local, pl[1], rtol=1e-5)
  np.testing.assert_allclose(got_ref.winner_local, rw[1], rtol=1e-5)
  np.testing.assert_allclose(got_ref.loser_global, rl[0], rtol=1e-5)

  loss, m = dpo.dpo_loss(got_pol, got_ref, BETA)
  dg = (pw[0] - rw[0]) - (pl[0] - rl[0])
  dl = (pw[1] - rw[1]) - (pl[1] - rl[1])
  delta = dg + dl
  want = np.mean(np.log1p(np.exp(-BETA * delta)))   # -log σ(βΔ)
  assert float(loss) == pytest.approx(want, rel=1e-4)
  assert float(m['dpo/loss']) == float(m['loss']) == float(loss)
  m = {k: float(x) for k, x in m.items()}
  close = lambda x: pytest.approx(x, rel=1e-4, abs=1e-4)
  assert m['dpo/global_margin'] == close(BETA * dg.mean())
  assert m['dpo/local_margin'] == close(BETA * dl.mean())
  assert m['dpo/reward_margin'] == close(BETA * delta.mean())
  assert m['dpo/global_margin'] + m['dpo/local_margin'] == close(
      m['dpo/reward_margin'])
  assert m['dpo/chosen_reward'] - m['dpo/rejected_reward'] == close(
      m['dpo/reward_margin'])
  assert m['dpo/accuracy'] == np.mean(delta > 0)
  assert abs(delta).min() > 1e-2  # random models: a real, non-trivial case

  # Policy == reference (the reference as a FrozenParam copy): log 2, margins 0.
  frozen = dpo.freeze(pol)
  assert not nnx.state(frozen, nnx.Param)
  loss, m = dpo.dpo_loss(got_pol, _pair_log_probs(frozen, batch), BETA)
  assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
  for k in ('reward_margin', 'global_margin', 'local_margin'):
    assert float(m[f'dpo/{k}']) == pytest.approx(0.0, abs=1e-6)


def test_dpo_steps_raise_the_winner_over_the_loser_and_leave_the_reference():
  c = _config('lm_dpo', beta=BETA)
  c.optim.lr, c.optim.warmup_steps = 1e-2, 1
  task = dpo.DPOTask(c)
  with nnx.use_eager_sharding(False):
    state = task.create_state(nnx.Rngs(0))
  graphdef, st = nnx.split(state)
  state = nnx.merge(graphdef, dpo.copy_policy_to_reference(st))
  ref_before = _pure(nnx.state(state.ref))
  assert _tree_equal(ref_before, _pure(nnx.state(state.model, nnx.Param)))
  batch = _pair_batch(c, seed=3)
  step = nnx.jit(lambda s, b: task.train_step(s, b, None))
  first = step(state, batch)
  assert float(first['dpo/loss']) == pytest.approx(math.log(2), abs=1e-5)
  assert float(first['dpo/accuracy']) == 0.0
  for _ in range(4):
    step(state, batch)
  pol, ref = _pair_log_probs(state.model, batch), _pair_log_probs(state.ref, batch)
  delta = ((np.asarray(pol.winner_global) + np.asarray(pol.winner_local))
           - (np.asarray(ref.winner_global) + np.asarray(ref.winner_local))
           - (np.asarray(pol.loser_global) + np.asarray(pol.loser_local))
           + (np.asarray(ref.loser_global) + np.asarray(ref.loser_local)))
  assert np.all(delta > 0), delta
  ev = nnx.jit(lambda s, b: task.eval_step(s, b, None))(state, batch)
  assert float(ev['dpo/accuracy']) == 1.0
  assert float(ev['dpo/loss']) < math.log(2)
  assert int(state.step[...]) == 5
  assert _tree_equal(_pure(nnx.state(state.ref)), ref_before)
  assert not _tree_equal(_pure(nnx.state(state.model, nnx.Param)), ref_before)


# -------------------------------------------------------------- warm start


def _write_pairs(path, c, n, seed=0, melody=True):
  rng = np.random.default_rng(seed)
  k, v = c.model.num_codebooks, c.model.codebook_size
  with open(path, 'w') as f:
    for i in range(n):
      obj = {'tags': TAGS, 'lyrics': LYRICS,
             'winner': rng.integers(0, v, (4 + i, k)).tolist(),
             'loser': rng.integers(0, v, (6, k)).tolist(), 'loser_end': False}
      if melody:
        obj['melody'] = rng.integers(-1, 12, 8).tolist()
      f.write(json.dumps(obj) + '\n')
  return path


@pytest.fixture(scope='module')
def lm_run(tmp_path_factory, tokenizer):
  """(config, workdir) of a tiny LM trained 2 steps on synthetic songs."""
  wd = str(tmp_path_factory.mktemp('lm') / 'run')
  c = _config('lm', tokenizer)
  c.data.batch_size = c.data.eval_batch_size = 8   # one per forced CPU device
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 2, 1, 2
  c.train.eval_every = 1000
  trainer.train(c, wd)
  return c, wd


def test_dpo_trainer_warm_starts_from_the_lm_run(lm_run, tokenizer, tmp_path):
  lm_config, lm_wd = lm_run
  pairs = _write_pairs(str(tmp_path / 'pairs.jsonl'), lm_config, 6)
  d = _config('lm_dpo', tokenizer, init_workdir=lm_wd, pairs=pairs)
  d.data.batch_size = d.data.eval_batch_size = 8
  d.optim.lr, d.optim.warmup_steps = 1e-3, 1
  d.train.steps, d.train.log_every, d.train.checkpoint_every = 2, 1, 2
  d.train.eval_every = 1000
  wd = str(tmp_path / 'dpo')
  trainer.train(d, wd)
  recs = metrics_lib.read_jsonl(os.path.join(wd, metrics_lib.METRICS_FILE))
  # Step 1 ran with policy == reference.
  assert recs[0]['dpo/loss'] == pytest.approx(math.log(2), abs=1e-5)
  assert recs[0]['dpo/reward_margin'] == pytest.approx(0.0, abs=1e-5)
  assert all(np.isfinite(r['dpo/loss']) for r in recs)
  # The reference is the LM's weights, untouched by 2 steps; the policy moved.
  lm = runs.load_run(lm_wd, config=lm_config).state
  st = runs.load_run(wd).state
  lm_params = _pure(nnx.state(lm.model, nnx.Param))
  assert _tree_equal(_pure(nnx.state(st.ref)), lm_params)
  assert not _tree_equal(_pure(nnx.state(st.model, nnx.Param)), lm_params)

  # The reference carries the policy's logical axis names (same layout).
  s = trainer.setup(d)
  names = lambda tree: [v.get_metadata().get('out_sharding') for v in
                        jax.tree.leaves(tree, is_leaf=dpo._is_var)]  # pylint: disable=protected-access
  assert names(s.abstract_state['ref']) == names(s.abstract_state['model'])
  assert ('layers', 'embed', 'heads', None) in names(s.abstract_state['ref'])
  assert jax.tree.leaves(s.state_shardings['ref']) == jax.tree.leaves(
      s.state_shardings['model'])

  bad = copy.deepcopy(d)
  bad.model.backbone.num_layers = 2
  s = trainer.setup(bad)
  with pytest.raises(ConfigError, match=r'model\.backbone\.num_layers') as e:
    s.task.warm_start(s.abstract_state, s.state_shardings)
  assert lm_wd in str(e.value)
  missing = copy.deepcopy(d)
  missing.dpo.init_workdir = ''
  s = trainer.setup(missing)
  with pytest.raises(ConfigError, match='dpo.init_workdir'):
    s.task.warm_start(s.abstract_state, s.state_shardings)


# --------------------------------------------------------------------- data


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
  c = _config('lm_dpo')
  k, v = c.model.num_codebooks, c.model.codebook_size
  good = json.dumps({'tags': TAGS, 'winner': [[1] * k] * 2, 'loser': [[2] * k]})

  def scan(*lines):
    path = tmp_path / 'p.jsonl'
    path.write_text('\n'.join(lines) + '\n')
    return dpo_pairs.JsonlPairs.scan(str(path), k, v), str(path)

  src, _ = scan(good, '', good)        # blank lines are skipped
  assert len(src) == 2 and src.where(1).endswith('line 3')
  np.testing.assert_array_equal(src[1]['winner'], [[1] * k] * 2)
  assert src[1]['winner_end'] and src[1]['melody'] is None

  path = str(tmp_path / 'p.jsonl')
  cases = [
      ((good, '', '{"tags": "x", "winner": [[1'), r'line 3: not valid JSON'),
      ((good, json.dumps({'winner': [[1] * (k - 1)], 'loser': [[1] * k]})),
       rf'line 2: "winner" has {k - 1} codebooks'),
      ((json.dumps({'winner': [[1] * k]}),), r'line 1: missing key "loser"'),
      ((json.dumps({'winner': [[v] * k], 'loser': [[0] * k]}),),
       r'line 1: "winner" has codes in .* outside \[0, 16\)'),
      ((json.dumps({'winner': [[1] * k], 'loser': [[0] * k], 'tag': 'x'}),),
       r"line 1: unknown key\(s\) \['tag'\]"),
      ((json.dumps({'winner': [[1] * k], 'loser': [[0] * k], 'melody': [12]}),),
       r'line 1: "melody" values'),
      ((json.dumps({'winner': [[1] * k], 'loser_npz': 'nope.npz'}),),
       r'line 1: "loser_npz" file not found'),
  ]
  for lines, pattern in cases:
    with pytest.raises(UserError, match=pattern) as e:
      scan(*lines)
    assert path in str(e.value)

  # Through the config, as the trainer reads it.
  (tmp_path / 'p.jsonl').write_text('\n'.join([good, good, '[1, 2]']))
  c.dpo.pairs = path
  with pytest.raises(UserError, match=r'line 3: expected a JSON object'):
    dpo_pairs.load_pairs(c)


def test_npz_candidates_and_array_record_shards_read_back(tmp_path):
  c = _config('lm_dpo')
  k, v = c.model.num_codebooks, c.model.codebook_size
  rng = np.random.default_rng(0)
  w, l = rng.integers(0, v, (5, k)), rng.integers(0, v, (3, k))
  np.savez(tmp_path / 'w.npz', codes=w)
  np.savez(tmp_path / 'l.npz', codes=l)
  (tmp_path / 'p.jsonl').write_text(json.dumps(
      {'winner_npz': 'w.npz', 'loser_npz': str(tmp_path / 'l.npz')}) + '\n')
  pair = dpo_pairs.JsonlPairs.scan(str(tmp_path / 'p.jsonl'), k, v)[0]
  np.testing.assert_array_equal(pair['winner'], w)
  np.testing.assert_array_equal(pair['loser'], l)

  # `musicjax prefs --out DIR` writes shards (two pairs per shard here).
  shards = str(tmp_path / 'shards')
  good = dict(pair, tags=TAGS, lyrics='', melody=np.arange(5) - 1,
              loser_end=False)
  writer = prefs._writer(shards, 2)  # pylint: disable=protected-access
  for p in (pair, good, good, dict(pair, winner=w[:, :k - 1])):  # last: bad K
    writer.write(p, {'metric': 'chroma'})
  writer.close()
  paths = sorted(glob.glob(os.path.join(shards, '*.array_record')))
  assert [os.path.basename(x) for x in paths] == [
      'pairs-00000.array_record', 'pairs-00001.array_record']
  src = dpo_pairs.ArrayRecordPairs(paths, k, v)
  assert len(src) == 4 and src.where(3) == f'{paths[1]} record 1'
  got = src[2]
  assert got['tags'] == TAGS and not got['loser_end'] and got['winner_end']
  np.testing.assert_array_equal(got['melody'], np.arange(5) - 1)
  np.testing.assert_array_equal(got['winner'], w)
  c.dpo.pairs = shards
  with pytest.raises(UserError, match=r'pairs-00001\.array_record record 1: '
                     r'"winner" has 2 codebooks'):
    dpo_pairs.load_pairs(c)
  with pytest.raises(UserError, match='a .jsonl file or a directory'):
    prefs._writer(str(tmp_path / 'pairs.json'), 2)  # pylint: disable=protected-access


def test_examples_batches_and_split(tmp_path, tokenizer):
  c = _config('lm_dpo', tokenizer, eval_fraction=0.3)
  c.data.reference_frames = 3
  c.data.batch_size = c.data.eval_batch_size = 2
  c.dpo.pairs = _write_pairs(str(tmp_path / 'p.jsonl'), c, 7)
  task = dpo.DPOTask(c)
  src = task.pair_source()
  split = dpo_pairs.split_indices(len(src), c.dpo.eval_fraction)
  assert split == dpo_pairs.split_indices(len(src), c.dpo.eval_fraction)  # stable
  assert split['train'] and split['eval']
  assert sorted(split['train'] + split['eval']) == list(range(len(src)))

  pair = src[0]
  ex = dpo_pairs.PairExample(c)(pair)
  text = conditions.ConditionText(text_lib.TextTokenizer.load(tokenizer),
                                  c.model.text_vocab_size)
  ids = dpo_pairs.prompt_ids(text, TAGS, LYRICS, c.data.max_text_tokens)
  p, v = len(ids), c.model.codebook_size
  for side in dpo_pairs.SIDES:
    np.testing.assert_array_equal(ex[f'{side}/text'][:p], ids)   # same prompt
    n = len(pair[side])
    np.testing.assert_array_equal(ex[f'{side}/audio'][p:p + n], pair[side])
  # The winner ends with END; the loser (loser_end false) does not.
  nw, nl = len(pair['winner']), len(pair['loser'])
  assert ex['winner/audio'][p + nw, 0] == layout.end_id(v)
  assert ex['winner/valid'].sum() == p + nw + 1
  assert ex['loser/valid'].sum() == p + nl
  # Melody: chroma class per frame (-1 -> SILENT) on the slot before it.
  mel = dpo_pairs.melody_ids(pair['melody'], nw + 1, True)
  np.testing.assert_array_equal(ex['winner/melody'][p - 1:p + nw], mel)
  assert not ex['ref_valid']
  # A candidate longer than data.max_frames is cut there, without END.
  nmax = c.data.max_frames
  long = dpo_pairs.PairExample(c)(dict(pair, winner=np.ones((nmax + 4, 3), np.int32)))
  assert long['winner/valid'].sum() == p + nmax
  assert np.all(long['winner/audio'][p:p + nmax] == 1)

  batch = next(iter(task.dataset('eval', 0, 1)))
  spec = task.batch_spec(c.data.eval_batch_size)
  assert set(batch) == set(spec)
  for k, s in spec.items():
    assert batch[k].shape == s.shape, k


# -------------------------------------------------------------------- prefs


def test_chroma_score_and_pair_selection():
  melody = np.array([0, 4, 7, -1, -1, 2])
  assert prefs.chroma_score(melody, melody) == 1.0
  # Silent melody frames do not count, whatever the candidate has there.
  assert prefs.chroma_score(np.array([0, 4, 7, 5, 9, 2]), melody) == 1.0
  assert prefs.chroma_score((melody + 1) % 12, melody) == 0.0
  assert prefs.chroma_score(np.array([0, 4, -1, 1, 1, 2]), melody) == 0.75
  assert prefs.chroma_score(np.array([0, 4]), melody) == 0.5   # too short: misses
  assert math.isnan(prefs.chroma_score(melody, np.full(6, -1)))

  def select(scores, margin=0.1, min_winner=0.0):
    return prefs.select_pair(scores, margin=margin, min_winner=min_winner)
  assert select([0.2, 0.9, 0.5, 0.1]) == (1, 3)
  assert select([0.5, 0.55, 0.52]) is None              # within the margin
  assert select([0.25, 0.0], min_winner=0.3) is None    # winner too weak
  assert select([0.25, 0.0], min_winner=0.2) == (0, 1)
  assert select([0.8, math.nan, 0.1]) == (0, 2)         # NaN left out
  assert select([0.8, math.nan]) is None


def test_tags_string_round_trips():
  from musicjax.data import song_text
  tags = {'genre': ['chorale', 'baroque'], 'mood': ['bright'], 'key': ['d major'],
          'meter': ['4/4']}
  again = song_text.derive_tags({'tags': prefs.tags_string(tags)})
  assert song_text.format_tags(again) == song_text.format_tags(tags)


def test_build_pairs_writes_scored_pairs_dpo_reads(tmp_path, tokenizer, monkeypatch):
  c = _config('lm_dpo', tokenizer)
  c.sample.cfg_scale = 1.5
  k = c.model.num_codebooks
  frame_rate, frames = 4.0, 8
  # Stand-in for codec decoding + chroma: the class is codebook 0 mod 12.
  monkeypatch.setattr(prefs, 'candidate_chroma',
                      lambda ctx, codes: np.asarray(codes)[:, 0] % 12)
  ctx = types.SimpleNamespace(
      config=c, model=F.make_model(c), frame_rate=frame_rate,
      mesh=mesh_lib.make_mesh(c.mesh, jax.devices()[:1]),
      rules=rules_lib.normalize_rules(c.sharding.rules),
      text=conditions.ConditionText(text_lib.TextTokenizer.load(tokenizer),
                                    c.model.text_vocab_size))
  rng = np.random.default_rng(0)
  prompts = [prefs.Prompt(TAGS, LYRICS, rng.integers(0, 12, frames), f'song{i}')
             for i in range(3)]
  prompts.append(prefs.Prompt(TAGS, '', np.full(frames, -1), 'silent'))
  out = str(tmp_path / 'pairs.jsonl')
  summary = prefs.build_pairs(ctx, prompts, candidates=4,
                              seconds=frames / frame_rate, margin=0.0,
                              min_winner=0.0, seed=0, out_path=out)
  assert summary['prompts'] == 4 and summary['skipped_no_melody'] == 1
  src = dpo_pairs.JsonlPairs.scan(out, k, c.model.codebook_size)
  assert len(src) == summary['pairs'] >= 1
  margins = []
  with open(out) as f:
    for i, line in enumerate(f):
      obj, pair = json.loads(line), src[i]
      mel = np.asarray(obj['melody'])
      sw = prefs.chroma_score(pair['winner'][:, 0] % 12, mel)
      sl = prefs.chroma_score(pair['loser'][:, 0] % 12, mel)
      scores = [s for s in obj['scores'] if s is not None]
      assert sw == max(scores) and sl == min(scores) and sw > sl
      assert pair['winner_end'] == (len(pair['winner']) < frames)
      assert obj['source'].startswith('song') and obj['metric'] == 'chroma'
      margins.append(sw - sl)
  assert summary['mean_margin'] == pytest.approx(np.mean(margins))
  # The written pairs make DPO examples.
  dpo_pairs.check_examples(c, src)
