"""Exact resume after kill -9, and SIGTERM preemption, via the real CLI."""
import os
import signal
import subprocess
import sys
import time

import pytest

from musicjax import config as config_lib
from musicjax.train import metrics as metrics_lib
from musicjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, 'tests', 'configs', 'toy.py')
STEPS = 40
# Log every step so every loss is compared; eval and checkpoints every 10.
COMMON = [f'train.steps={STEPS}', 'train.log_every=1', 'train.eval_every=10',
          'train.checkpoint_every=10']
KEYS = ('loss', 'grad_norm', 'eval/loss', 'train/nonfinite_skipped')


def _env():
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') +
             ' --xla_force_host_platform_device_count=8')
  return env


def _cli(workdir, overrides, **kw):
  cmd = [sys.executable, '-m', 'musicjax.cli', 'train', '--config', TOY,
         '--workdir', workdir] + [f'--config.{o}' for o in overrides]
  return subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kw)


def _wait_for(pred, proc, timeout=120):
  t0 = time.time()
  while not pred():
    if proc.poll() is not None:
      raise AssertionError('process ended early:\n' + proc.stdout.read())
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError('timed out')
    time.sleep(0.02)


def _metrics(workdir):
  return metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


def _logged_lines(workdir):
  """Complete lines so far (the writer may be mid-line while we poll)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return 0
  with open(path) as f:
    return f.read().count('\n')


def _assert_same_run(got, want):
  assert [r['step'] for r in got] == [r['step'] for r in want]
  for g, w in zip(got, want):
    for k in KEYS:
      assert g.get(k) == w.get(k), (g['step'], k, g.get(k), w.get(k))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted run (in-process: same 8 CPU devices, same compiler)."""
  wd = str(tmp_path_factory.mktemp('reference'))
  trainer.train(config_lib.load(TOY, COMMON), wd)
  recs = _metrics(wd)
  assert [r['step'] for r in recs] == list(range(1, STEPS + 1))
  return recs


@pytest.mark.slow
def test_kill9_then_restart_is_bit_identical(tmp_path, reference):
  wd = str(tmp_path)
  proc = _cli(wd, COMMON + ['toy.batch_delay_ms=40'])
  committed = os.path.join(wd, 'checkpoints', '10')
  _wait_for(lambda: os.path.isdir(committed), proc)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  proc.stdout.close()
  logged = _metrics(wd)
  assert logged and logged[-1]['step'] < STEPS  # really interrupted

  proc = _cli(wd, COMMON)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert 'resumed from checkpoint at step' in out
  _assert_same_run(_metrics(wd), reference)


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_zero(tmp_path, reference):
  wd = str(tmp_path)
  proc = _cli(wd, COMMON + ['toy.batch_delay_ms=40',
                            'train.checkpoint_every=1000'])
  _wait_for(lambda: _logged_lines(wd) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  stop = _metrics(wd)[-1]['step']
  assert 3 <= stop < STEPS
  assert f'SIGTERM: saved a checkpoint at step {stop}' in out
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == [str(stop)]

  proc = _cli(wd, COMMON + ['train.checkpoint_every=1000'])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert f'resumed from checkpoint at step {stop}' in out
  _assert_same_run(_metrics(wd), reference)
