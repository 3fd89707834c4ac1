"""Multi-process start-up: `jax.distributed.initialize` only when needed."""
from __future__ import annotations

import os

import jax

_initialized = False


def _wanted() -> bool:
  env = os.environ
  if int(env.get('JAX_NUM_PROCESSES', '1') or 1) > 1:
    return True
  if env.get('MUSICJAX_DISTRIBUTED', '') in ('1', 'true', 'yes'):
    return True
  if int(env.get('SLURM_NTASKS', '1') or 1) > 1:
    return True
  return False


def maybe_initialize() -> bool:
  """Calls `jax.distributed.initialize` when launched as several processes.

  Triggers: JAX_NUM_PROCESSES>1 with JAX_COORDINATOR_ADDRESS/JAX_PROCESS_ID
  (launch/local.sh), SLURM_NTASKS>1, or MUSICJAX_DISTRIBUTED=1 (TPU pods and
  other clusters JAX auto-detects). Returns whether it initialized. Must run
  before anything touches the JAX backend.
  """
  global _initialized
  if _initialized or not _wanted():
    return _initialized
  # CPU collectives across processes need gloo (the default has none); the
  # setting only affects the CPU backend, so it is harmless on GPU/TPU.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  env = os.environ
  if 'JAX_COORDINATOR_ADDRESS' in env and 'JAX_PROCESS_ID' in env:
    jax.distributed.initialize(
        coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(env['JAX_NUM_PROCESSES']),
        process_id=int(env['JAX_PROCESS_ID']))
  else:
    jax.distributed.initialize()  # SLURM / TPU pod auto-detection
  _initialized = True
  return True


def is_primary() -> bool:
  """True on the process that writes logs, metrics and config (process 0)."""
  return jax.process_index() == 0
