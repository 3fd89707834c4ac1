"""Tiny config for trainer tests: the toy MLP task with small numbers."""
from musicjax import config as config_lib
from tests import toy_task


def get_config():
  toy_task.register()  # also in `musicjax train` subprocesses
  c = config_lib.for_task('toy')
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.train.steps = 20
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.eval_steps = 2
  c.train.checkpoint_every = 10
  c.train.max_nonfinite = 3
  c.checkpoint.keep = 2
  return c
