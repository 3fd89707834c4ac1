"""The generic trainer, in-process, with the toy task on 8 CPU devices."""
import json
import os
import struct

import jax
import numpy as np
import pytest
from flax import nnx

from musicjax import config as config_lib
from musicjax.parallel import rules as rules_lib
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import metrics as metrics_lib
from musicjax.train import progress
from musicjax.train import runs
from musicjax.train import trainer

TOY = os.path.join(os.path.dirname(__file__), 'configs', 'toy.py')


def toy_config(*overrides):
  return config_lib.load(TOY, list(overrides))


def _event_tags(workdir):
  """Tags in the TensorBoard event files (TFRecord framing of Event protos)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for name in os.listdir(workdir):
    if not name.startswith('events.out.tfevents'):
      continue
    with open(os.path.join(workdir, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack('<Q', data[pos:pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      tags.update(v.tag for v in ev.summary.value)
      pos += 12 + n + 4
  return tags


def test_train_logs_evaluates_and_checkpoints(tmp_path, monkeypatch):
  wd = str(tmp_path)
  # The bad-file count is process-global (other tests' abandoned prefetch
  # threads may still add to it); check the wiring with a known value.
  from musicjax.data import audio
  monkeypatch.setattr(audio, 'bad_file_count', lambda: 7)
  c = toy_config('train.steps=20', 'train.log_every=5', 'train.eval_every=10',
                 'train.checkpoint_every=10')
  last = trainer.train(c, wd)
  recs = metrics_lib.read_jsonl(os.path.join(wd, 'metrics.jsonl'))
  assert [r['step'] for r in recs] == [5, 10, 15, 20]
  for r in recs:
    assert r['train/nonfinite_skipped'] == 0 and r['data/bad_files'] == 7
    assert r['steps_per_sec'] > 0 and np.isfinite(r['loss'])
  assert recs[-1]['loss'] < recs[0]['loss']  # it learns
  assert 'eval/loss' in recs[1] and 'eval/loss' not in recs[0]
  assert last['step'] == 20 and last['loss'] == recs[-1]['loss']
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['10', '20']
  assert json.loads(config_lib.load_saved(wd).to_json()) == json.loads(c.to_json())
  tags = _event_tags(wd)
  assert {'loss', 'eval/loss', 'audio/toy_tone', 'image/w1'} <= tags
  # evaluate() on the restored checkpoint reproduces the logged eval exactly.
  ev = trainer.evaluate(c, wd)
  assert ev == {'step': 20.0, 'loss': recs[-1]['eval/loss']}
  # load_run gives a usable module with the trained weights.
  run = runs.load_run(wd, step=10, config=c)
  with run.activate():
    y = run.model(np.ones((8, 16), np.float32))
  assert y.shape == (8, 16) and np.all(np.isfinite(np.asarray(y)))
  # Running again with the same steps is a no-op resume (nothing re-logged).
  assert trainer.train(c, wd) == {}
  assert metrics_lib.read_jsonl(os.path.join(wd, 'metrics.jsonl')) == recs


def test_nonfinite_step_keeps_the_old_state():
  c = toy_config('toy.nonfinite_steps=(2,)')
  s = trainer.setup(c)
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    state = trainer.init_state(s)
    step_fn = trainer.make_train_step(s)
    it = iter(s.task.dataset('train', 0, 1))
    spec = s.task.batch_spec(8)
    batch = lambda: trainer.global_batch(next(it), spec, s.batch_shardings)
    state, m, bad = step_fn(state, batch(), np.int32(1))
    assert not bool(bad) and np.isfinite(float(m['loss']))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    state, m, bad = step_fn(state, batch(), np.int32(2))
    assert bool(bad) and np.isnan(float(m['loss']))
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    state, m, bad = step_fn(state, batch(), np.int32(3))
    assert not bool(bad)
    assert int(state['optimizer']['step'][...]) == 2  # two real updates


def test_nonfinite_guard_counts_then_stops(tmp_path):
  wd = str(tmp_path)
  c = toy_config('train.steps=12', 'train.log_every=1', 'train.eval_every=100',
                 'train.checkpoint_every=2', 'train.max_nonfinite=3',
                 'toy.nonfinite_steps=(2, 5, 6, 7)')
  with pytest.raises(trainer.NonFiniteError,
                     match=r'3 consecutive non-finite steps \(last at step 7; '
                     r'config\.train\.max_nonfinite=3\)'):
    trainer.train(c, wd)
  recs = metrics_lib.read_jsonl(os.path.join(wd, 'metrics.jsonl'))
  assert [r['step'] for r in recs] == [1, 2, 3, 4, 5, 6]  # nothing at 7
  assert [r['train/nonfinite_skipped'] for r in recs] == [0, 1, 1, 1, 2, 3]
  assert recs[1]['loss'] == 'nan' and np.isfinite(recs[2]['loss'])
  # Checkpoint 6 holds the good state of step 4 (5 and 6 were skipped); the
  # stop happened before any further save.
  manager = ckpt_lib.make_manager(wd, 5, False)
  assert manager.all_steps() == [4, 6]
  s = trainer.setup(c)
  a = ckpt_lib.restore(manager, 4, s.abstract_state, s.state_shardings)
  b = ckpt_lib.restore(manager, 6, s.abstract_state, s.state_shardings)
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, nnx.to_pure_dict(a)),
               jax.tree.map(np.asarray, nnx.to_pure_dict(b)))
  assert ckpt_lib.restore_meta(manager, 6) == {'nonfinite_skipped': 3,
                                               'nonfinite_consecutive': 2}
  manager.close()


def test_truncate_jsonl_drops_replayed_and_torn_lines(tmp_path):
  p = tmp_path / 'metrics.jsonl'
  p.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
               '{"step": 3, "loss": 0.2}\n{"step": 4, "lo')
  metrics_lib.truncate_jsonl(str(p), 2)
  assert metrics_lib.read_jsonl(str(p)) == [{'step': 1, 'loss': 1.0},
                                            {'step': 2, 'loss': 0.5}]


def test_progress_line():
  line = progress.format_progress(120, 1000, 3.4, {'loss': 1.2345})
  assert line == 'step 120/1000  3.4 steps/s  loss 1.234  ETA 4m19s'
  assert progress.format_duration(3 * 3600 + 125) == '3h02m'
  assert progress.format_progress(1, 2, 0.0).endswith('ETA ?')


def test_eta_starts_after_the_first_step():
  now = [0.0]
  eta = progress.Eta(100, clock=lambda: now[0])
  assert eta.seconds_left(0) == float('inf')
  now[0] = 60.0                 # step 1: compile + run, one minute
  eta.start(1)
  assert eta.seconds_left(1) == float('inf')  # no step timed yet: 'ETA ?'
  now[0] = 60.0 + 9 * 0.5       # steps 2..10 at 0.5 s each
  assert eta.seconds_left(10) == pytest.approx(90 * 0.5)
  t = eta.now()
  now[0] += 30.0                # an eval: not training time
  eta.exclude(eta.now() - t)
  now[0] += 10 * 0.5            # steps 11..20
  assert eta.seconds_left(20) == pytest.approx(80 * 0.5)
  line = progress.format_progress(20, 100, 2.0, eta_seconds=eta.seconds_left(20))
  assert line.endswith('ETA 40s')


def test_progress_eta_leaves_out_the_first_step(tmp_path, monkeypatch, capsys):
  """With a fake clock where step 1 (compile) takes 100 s and each later step
  1 s, every ETA the trainer prints counts 1 s per step left."""
  now = [0.0]
  monkeypatch.setattr(progress, 'time', type(
      'FakeTime', (), {'perf_counter': staticmethod(lambda: now[0])}))
  real_make = trainer.make_train_step

  def make(s):
    step_fn = real_make(s)

    def timed(state, batch, step):
      now[0] += 100.0 if int(step) == 1 else 1.0
      return step_fn(state, batch, step)
    return timed
  monkeypatch.setattr(trainer, 'make_train_step', make)
  c = toy_config('train.steps=20', 'train.log_every=5', 'train.eval_every=10',
                 'train.checkpoint_every=10')
  trainer.train(c, str(tmp_path))
  etas = [line.rsplit('ETA ', 1)[1] for line in capsys.readouterr().err.splitlines()
          if line.startswith('step ') and 'ETA' in line]
  assert etas == ['15s', '10s', '5s', '0s'], etas


def test_eval_at_start_logs_a_baseline_at_step_zero(tmp_path):
  wd = str(tmp_path)
  c = toy_config('train.steps=20', 'train.log_every=10', 'train.eval_every=20',
                 'train.checkpoint_every=20', 'train.eval_at_start=true')
  trainer.train(c, wd)
  recs = metrics_lib.read_jsonl(os.path.join(wd, 'metrics.jsonl'))
  assert [r['step'] for r in recs] == [0, 10, 20]
  assert set(recs[0]) == {'step', 'eval/loss'}
  assert recs[-1]['eval/loss'] < recs[0]['eval/loss']  # training helped
  # on_log sees what metrics.jsonl gets, step by step (resumed: nothing new).
  seen = []
  trainer.train(toy_config('train.steps=30', 'train.log_every=10',
                           'train.eval_every=20', 'train.checkpoint_every=20'),
                wd, on_log=lambda step, rec: seen.append((step, dict(rec))))
  recs = metrics_lib.read_jsonl(os.path.join(wd, 'metrics.jsonl'))
  assert [s for s, _ in seen] == [30] and recs[-1]['step'] == 30
  assert seen[0][1]['loss'] == recs[-1]['loss']


def test_host_waits_when_max_inflight_steps_are_queued(tmp_path, monkeypatch):
  """Between two metric fetches the host never runs more than
  train.max_inflight_steps steps (or eval batches) ahead of the device."""
  waited = []
  real = jax.block_until_ready

  def spy(x):
    waited.append(x)
    return real(x)
  monkeypatch.setattr(jax, 'block_until_ready', spy)
  c = toy_config('train.steps=8', 'train.log_every=8', 'train.eval_every=8',
                 'train.checkpoint_every=8', 'train.eval_steps=5',
                 'train.max_inflight_steps=2')
  trainer.train(c, str(tmp_path))
  steps = [w[0] for w in waited if isinstance(w, tuple)]
  # Dispatching step k waits for step k-2: 8 steps, nothing fetched between.
  assert steps == [1, 2, 3, 4, 5, 6]
  # The 5 eval batches: batches 3..5 wait for batches 1..3.
  assert sum(isinstance(w, dict) for w in waited) == 3
