"""`musicjax export` from two JAX processes (loopback, gloo): the arrays span
both processes, each process gathers them, only process 0 writes, and the
files hold exactly what a one-process export writes."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import lm_fixtures as LF
from musicjax.export import export as E
from musicjax.export import files
from musicjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_export_equals_one_process(tmp_path):
  c = LF.small_config()
  c.train.steps = c.train.checkpoint_every = 2
  c.train.log_every = c.train.eval_every = 2
  c.train.eval_steps = 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2   # batch 4 over data x fsdp
  run, one, two = (str(tmp_path / n) for n in ('run', 'one', 'two'))
  trainer.train(c, run)
  E.export_workdir(c, run, one)

  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, PYTHON=sys.executable,
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') +
             ' --xla_force_host_platform_device_count=4')
  cmd = [os.path.join(ROOT, 'launch', 'local.sh'), '2', '--', sys.executable,
         '-m', 'musicjax.cli', 'export', '--workdir', run, '--out', two,
         '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.mesh.tensor=2']
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  # Both processes report; their arrays really spanned the two processes.
  # launch/local.sh prefixes each line with [p<i>].
  lines = [re.sub(r'^\[p\d+\] ', '', l) for l in proc.stdout.splitlines()]
  reports = [json.loads(l) for l in lines
             if l.startswith('{') and '"gathered_from_other_processes"' in l]
  assert len(reports) == 2, proc.stdout
  assert all(r['gathered_from_other_processes'] > 0 for r in reports)
  assert sum('files' in r for r in reports) == 1      # process 0 wrote
  get1, names1 = files.reader(one)
  get2, names2 = files.reader(two)
  assert names1 == names2
  for n in names1:
    np.testing.assert_array_equal(get1(n), get2(n), err_msg=n)
  # One writer: the files exist once, not one set per process.
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))
