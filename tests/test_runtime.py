"""The CLI's glibc malloc tuning (musicjax/runtime.py): applied once per
process on a glibc CPU host, and never against the user's own settings."""
import json
import os
import subprocess
import sys

import pytest

from musicjax import runtime

PROBE = ('import json; from musicjax import runtime; '
         'print(json.dumps(runtime.tune_malloc()))')


def _status(**env):
  clean = {k: v for k, v in os.environ.items()
           if k not in runtime.USER_ENV + (runtime.OPT_OUT,)}
  out = subprocess.run([sys.executable, '-c', PROBE], env={**clean, **env},
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(runtime._glibc() is None, reason='mallopt is glibc only')
def test_tuned_on_a_glibc_cpu_host():
  status = _status(JAX_PLATFORMS='cpu')
  assert status == {'tuned': True, 'mallopt': {
      'M_ARENA_MAX': 1, 'M_MMAP_MAX': 0, 'M_TRIM_THRESHOLD': 2 ** 31 - 1}}


def test_the_users_settings_and_the_opt_out_win():
  status = _status(JAX_PLATFORMS='cpu', MALLOC_ARENA_MAX='4')
  assert not status['tuned'] and 'MALLOC_ARENA_MAX' in status['why']
  status = _status(JAX_PLATFORMS='cpu', MUSICJAX_MALLOC='default')
  assert status == {'tuned': False, 'why': 'MUSICJAX_MALLOC=default'}


def test_left_alone_where_an_accelerator_is_attached(monkeypatch):
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.setattr(runtime.glob, 'glob',
                      lambda pattern: ['/dev/nvidia0'] if 'nvidia' in pattern else [])
  assert runtime.tune_malloc() == {'tuned': False, 'why': 'accelerator attached'}
