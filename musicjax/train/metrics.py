"""Metric averaging and writers: WORKDIR/metrics.jsonl plus TensorBoard events.

TensorBoard files are written with tensorboardX, because clu.metric_writers
imports TensorFlow. Only process 0 writes; other processes get a null writer.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from clu import metrics as clu_metrics

METRICS_FILE = 'metrics.jsonl'


def average(per_step: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Mean of each metric over a window of host-fetched per-step dicts.

  One clu `Average` per metric over the stacked window (clu.metrics imports
  without TensorFlow; only its writers need it).
  """
  if not per_step:
    return {}
  out = {}
  for k in per_step[0].keys():
    values = np.stack([np.asarray(m[k], np.float32).reshape(-1) for m in per_step])
    out[k] = float(clu_metrics.Average.from_model_output(values).compute())
  return out


def truncate_jsonl(path: str, max_step: int) -> None:
  """Drops records with step > max_step (resume replays those steps)."""
  if not os.path.isfile(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by kill -9
      if rec.get('step', 0) <= max_step:
        keep.append(line)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(l + '\n' for l in keep)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _jsonable(v: Any) -> Any:
  if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
    return int(v)
  v = float(v)
  return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf


class MetricWriter:
  """Writes scalars to metrics.jsonl + TensorBoard, audio/images to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._path = os.path.join(workdir, METRICS_FILE)
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # only process 0 needs it
      self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    rec = {'step': int(step)}
    rec.update({k: _jsonable(v) for k, v in sorted(scalars.items())})
    with open(self._path, 'a') as f:
      f.write(json.dumps(rec) + '\n')
      f.flush()
    for k, v in scalars.items():
      if math.isfinite(float(v)):  # a skipped step's NaN stays in the jsonl only
        self._tb.add_scalar(k, float(v), step)

  def write_summaries(self, step: int, summaries: Mapping[str, Any]) -> None:
    """`{'audio/x': (wave, sample_rate), 'image/y': HxWxC float in [0,1]}`."""
    if not self.enabled:
      return
    for name, value in summaries.items():
      if name.startswith('audio/'):
        wave, sr = value
        wave = np.clip(np.asarray(wave, np.float32).reshape(-1), -1, 1)
        self._tb.add_audio(name, wave, step, sample_rate=int(sr))
      elif name.startswith('image/'):
        self._tb.add_image(name, np.asarray(value), step, dataformats='HWC')
      else:
        raise ValueError(f'summary {name!r}: name must start with audio/ or image/')

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
