"""Two JAX processes on loopback (gloo) via launch/local.sh: train, SIGTERM
(both processes agree on the stop step), multi-process checkpoint, resume.

What this proves: the 2x4-device run (params sharded over fsdp across the
process boundary) logs the same losses as a 1-process 8-device run with the same
global batch, up to float summation order (each process feeds a different half
of every global batch, so the batch rows are permuted); and it stops on SIGTERM
at one agreed step with a checkpoint and exit 0, then resumes from it.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from musicjax import config as config_lib
from musicjax.train import metrics as metrics_lib
from musicjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, 'tests', 'configs', 'toy.py')
STEPS = 16
COMMON = [f'train.steps={STEPS}', 'train.log_every=1', 'train.eval_every=8',
          'train.checkpoint_every=1000', 'mesh.data=4', 'mesh.fsdp=2']


def _launch(workdir, overrides):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, PYTHON=sys.executable,
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') +
             ' --xla_force_host_platform_device_count=4')
  cmd = [os.path.join(ROOT, 'launch', 'local.sh'), '2', '--', sys.executable,
         '-m', 'musicjax.cli', 'train', '--config', TOY, '--workdir', workdir]
  cmd += [f'--config.{o}' for o in overrides]
  return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_stop_resume(tmp_path):
  ref_dir, wd = str(tmp_path / 'ref'), str(tmp_path / 'mh')
  trainer.train(config_lib.load(TOY, COMMON), ref_dir)
  ref = metrics_lib.read_jsonl(os.path.join(ref_dir, 'metrics.jsonl'))

  proc = _launch(wd, COMMON + ['toy.batch_delay_ms=100'])
  path = os.path.join(wd, 'metrics.jsonl')
  t0 = time.time()
  def lines():  # complete lines only: p0 may be mid-write while we poll
    return open(path).read().count('\n') if os.path.isfile(path) else 0
  while lines() < 2:
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() - t0 < 180, 'timed out'
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # local.sh forwards it to both processes
  out, _ = proc.communicate(timeout=180)
  assert proc.returncode == 0, out
  stop = metrics_lib.read_jsonl(path)[-1]['step']
  assert 2 <= stop < STEPS, out
  for p in ('[p0]', '[p1]'):  # both stopped at the same step
    assert f'{p} SIGTERM: saved a checkpoint at step {stop}' in out, out
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == [str(stop)]

  proc = _launch(wd, COMMON)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert f'[p0] resumed from checkpoint at step {stop}' in out, out
  got = metrics_lib.read_jsonl(path)
  assert [r['step'] for r in got] == list(range(1, STEPS + 1))
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g['loss'], r['loss'], rtol=1e-5, err_msg=str(g['step']))
    if 'eval/loss' in r:
      np.testing.assert_allclose(g['eval/loss'], r['eval/loss'], rtol=1e-5)
