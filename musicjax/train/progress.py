"""One-line progress reports: `step 120/1000  3.4 steps/s  loss 1.23  ETA 4m19s`."""
from __future__ import annotations

import math
import sys
from typing import Mapping, TextIO


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  s = int(round(seconds))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f'{h}h{m:02d}m'
  if m:
    return f'{m}m{s:02d}s'
  return f'{s}s'


def format_progress(step: int, total: int, steps_per_sec: float,
                    metrics: Mapping[str, float] | None = None,
                    keys: tuple[str, ...] = ('loss',)) -> str:
  parts = [f'step {step}/{total}', f'{steps_per_sec:.3g} steps/s']
  for k in keys:
    if metrics and k in metrics:
      parts.append(f'{k} {metrics[k]:.4g}')
  eta = (total - step) / steps_per_sec if steps_per_sec > 0 else float('inf')
  parts.append(f'ETA {format_duration(eta)}')
  return '  '.join(parts)


def report(step: int, total: int, steps_per_sec: float,
           metrics: Mapping[str, float] | None = None,
           stream: TextIO | None = None,
           keys: tuple[str, ...] = ('loss',)) -> None:
  print(format_progress(step, total, steps_per_sec, metrics, keys),
        file=stream or sys.stderr, flush=True)
