"""Process-wide settings the CLI applies before JAX starts any thread, and
facts about the machine (load, CPU model) for benchmarks and reports.

glibc malloc. XLA:CPU allocates an execution's temporaries as one buffer and
frees it when the execution ends: 1.5 GB for the train step of
configs/lm/bench_tiny.py. glibc serves an allocation that large with mmap
(the executing thread's arena cannot hold it) and unmaps it on free, so every
step faults all of its pages in again: about 390,000 page faults per step,
0.3-0.4 s of a 1.2 s step on 2 cores (measured; `MALLOC_MMAP_MAX_` and
`MALLOC_TRIM_THRESHOLD_` alone did not stop it, the per-thread arenas still
mmap). One arena, no mmap and a high trim threshold keep freed memory in the
process, and the next step reuses it without a fault. The cost: the process
keeps its peak heap instead of returning it to the kernel, and threads share
one malloc arena.

A user's own `MALLOC_ARENA_MAX` / `MALLOC_MMAP_MAX_` / `MALLOC_TRIM_THRESHOLD_`
environment wins (nothing is changed), and `MUSICJAX_MALLOC=default` turns
the tuning off. It applies only where XLA:CPU does the work: not on a host
with a GPU or TPU attached (their temporaries live in device memory, and one
arena could slow the host threads that feed them).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform

# mallopt(3) parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2 ** 31 - 1        # mallopt takes an int: 2 GiB
USER_ENV = ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_')
OPT_OUT = 'MUSICJAX_MALLOC'
# Device files of an attached accelerator (NVIDIA GPU; TPU VMs: accel or vfio).
ACCELERATOR_DEVICES = ('/dev/nvidia[0-9]*', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')

_status: dict = {'tuned': False, 'why': 'not applied (tune_malloc not called)'}


def _glibc():
  """The C library when it is glibc (mallopt with these parameters), else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    return libc
  except (OSError, AttributeError):
    return None


def tune_malloc() -> dict:
  """Sets glibc malloc to keep freed memory (see the module docstring), once,
  early in the process; returns `malloc_status()`."""
  global _status
  if os.environ.get(OPT_OUT, '') == 'default':
    _status = {'tuned': False, 'why': f'{OPT_OUT}=default'}
    return malloc_status()
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms != 'cpu' and any(glob.glob(g) for g in ACCELERATOR_DEVICES):
    _status = {'tuned': False, 'why': 'accelerator attached'}
    return malloc_status()
  user = [k for k in USER_ENV if k in os.environ]
  if user:
    _status = {'tuned': False, 'why': f'user environment {", ".join(user)}'}
    return malloc_status()
  libc = _glibc()
  if libc is None:
    _status = {'tuned': False, 'why': 'not glibc'}
    return malloc_status()
  settings = {'M_ARENA_MAX': (M_ARENA_MAX, 1), 'M_MMAP_MAX': (M_MMAP_MAX, 0),
              'M_TRIM_THRESHOLD': (M_TRIM_THRESHOLD, TRIM_THRESHOLD)}
  done = {name: value for name, (param, value) in settings.items()
          if libc.mallopt(param, value) == 1}
  _status = {'tuned': len(done) == len(settings), 'mallopt': done}
  return malloc_status()


def malloc_status() -> dict:
  """What `tune_malloc` did in this process (benches report it)."""
  return dict(_status)


# ---- the machine, for benchmarks and reports --------------------------------
def load_now() -> float | None:
  """The 1-minute load average now (None where the OS has none)."""
  try:
    return float(os.getloadavg()[0])
  except (AttributeError, OSError):
    return None


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
