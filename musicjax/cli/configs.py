"""The config a verb runs with: --config (plus overrides) or WORKDIR's own."""
from __future__ import annotations

import os

from musicjax import config as cfg


def load_config(args, overrides: list[str]):
  """--config with `overrides`, else the config.json saved in --workdir."""
  workdir = getattr(args, 'workdir', None)
  if args.config:
    config = cfg.load(args.config, overrides)
    check_same_task(args, config, workdir)
    return config
  saved = workdir and os.path.isfile(os.path.join(workdir, 'config.json'))
  if not workdir or (args.verb == 'train' and not saved):
    # A new run: the missing config is what to fix.
    raise cfg.ConfigError(
        'no --config given and no config.json in --workdir '
        f'{workdir!r}; pass --config configs/<family>/<name>.py')
  if not os.path.isdir(workdir):
    raise cfg.ConfigError(f'--workdir {workdir!r} does not exist; pass the '
                          'directory of a `musicjax train` run')
  from musicjax.train import runs  # here: runs imports jax (see cli/app.py)
  return runs.saved_config(workdir, verb=args.verb, overrides=overrides)


def check_same_task(args, config, workdir) -> None:
  """--config must be of the task of the run in --workdir, when there is one.

  Otherwise restoring fails on mismatched weights, naming neither task.
  """
  if not workdir or args.verb == 'import-torch':  # that workdir is new
    return
  saved = cfg.saved_task(workdir)
  if saved is None or saved == config.task:
    return
  if args.verb == 'train' and not os.path.isdir(
      os.path.join(workdir, 'checkpoints')):
    return  # nothing to resume: the run starts over with the new config
  raise cfg.ConfigError(
      f'--config {args.config} is a config for {cfg.run_kind(config.task)} '
      f'(config.task {config.task!r}), but --workdir {workdir} is '
      f'{cfg.run_kind(saved)} (config.task {saved!r} in its config.json): '
      "leave out --config to use the run's own config.json, or pass the "
      f'--workdir of {cfg.run_kind(config.task)}')
