"""One-line progress reports: `step 120/1000  3.4 steps/s  loss 1.23  ETA 4m19s`."""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Mapping, TextIO


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


class Eta:
  """Time left, from the steps done since the first step finished.

  The first step of a run (or of a resumed run) includes compiling it, often
  far longer than a step: an ETA from the run's start would be off by the
  compile time times the steps left. The clock starts once that step is done
  (start()); time spent on eval, summaries and checkpoints is left out
  (exclude()), as it is from steps/s.
  """

  def __init__(self, total: int, clock: Callable[[], float] | None = None):
    self.total = total
    self._clock = clock or (lambda: time.perf_counter())
    self._t0: float | None = None
    self._step0 = 0
    self._excluded = 0.0

  def start(self, step: int) -> None:
    """Call when `step` (the run's first) has finished, compile included."""
    self._t0, self._step0, self._excluded = self._clock(), step, 0.0

  def now(self) -> float:
    return self._clock()

  def exclude(self, seconds: float) -> None:
    """Leaves out `seconds` (of now()) spent on anything but training steps."""
    self._excluded += seconds

  def seconds_left(self, step: int) -> float:
    """inf (shown as '?') until a step after the first one has finished."""
    if self._t0 is None or step <= self._step0:
      return float('inf')
    elapsed = self._clock() - self._t0 - self._excluded
    if elapsed <= 0:
      return float('inf')
    return (self.total - step) * elapsed / (step - self._step0)


def format_progress(step: int, total: int, steps_per_sec: float,
                    metrics: Mapping[str, float] | None = None,
                    keys: tuple[str, ...] = ('loss',),
                    eta_seconds: float | None = None) -> str:
  """The progress line. The ETA is `eta_seconds` (Eta) when given, else the
  steps left at `steps_per_sec`."""
  parts = [f'step {step}/{total}', f'{steps_per_sec:.3g} steps/s']
  for k in keys:
    if metrics and k in metrics:
      parts.append(f'{k} {metrics[k]:.4g}')
  if eta_seconds is None:
    eta_seconds = ((total - step) / steps_per_sec if steps_per_sec > 0
                   else float('inf'))
  parts.append(f'ETA {format_duration(eta_seconds)}')
  return '  '.join(parts)


def report(step: int, total: int, steps_per_sec: float,
           metrics: Mapping[str, float] | None = None,
           stream: TextIO | None = None,
           keys: tuple[str, ...] = ('loss',),
           eta_seconds: float | None = None) -> None:
  print(format_progress(step, total, steps_per_sec, metrics, keys, eta_seconds),
        file=stream or sys.stderr, flush=True)
