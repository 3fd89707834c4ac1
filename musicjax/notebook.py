"""What the notebooks in notebooks/ share: quick settings, paths, a live loss
plot and audio players.

Quick settings: with MUSICJAX_QUICK=1 (as CI runs them) every notebook uses
tiny step counts and clip lengths and finishes in about a minute on a CPU;
without it the notebooks train for a few minutes, long enough to hear
something. `choose(quick=..., full=...)` is how a notebook says both.

Runs go to $MUSICJAX_RUNS (default <repo>/runs/notebooks), one folder per
model, so a later notebook reuses an earlier one's codec instead of training
another.
"""
from __future__ import annotations

import html
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

QUICK_ENV = 'MUSICJAX_QUICK'
RUNS_ENV = 'MUSICJAX_RUNS'


def is_quick() -> bool:
  return os.environ.get(QUICK_ENV, '') not in ('', '0', 'false', 'False')


def choose(*, quick: Any, full: Any) -> Any:
  return quick if is_quick() else full


def repo_root(start: str | None = None) -> str:
  """The checkout holding configs/ and launch/: `start` (default: the working
  directory) or one of its parents."""
  here = os.path.abspath(start or os.getcwd())
  d = here
  while True:
    if os.path.isdir(os.path.join(d, 'configs')) and os.path.isdir(
        os.path.join(d, 'musicjax')):
      return d
    parent = os.path.dirname(d)
    if parent == d:
      raise FileNotFoundError(
          f'no musicjax checkout (a folder with configs/ and musicjax/) at or '
          f'above {here}: run the notebook from the repository, or run its '
          'first cell, which clones it in Colab')
    d = parent


def config_path(*parts: str) -> str:
  return os.path.join(repo_root(), 'configs', *parts)


def runs_dir(*parts: str) -> str:
  root = os.environ.get(RUNS_ENV) or os.path.join(repo_root(), 'runs', 'notebooks')
  return os.path.join(root, *parts)


def _display(obj, handle=None):
  from IPython import display
  if handle is None:
    return display.display(obj, display_id=True)
  handle.update(obj)
  return handle


class LivePlot:
  """`trainer.train(..., on_log=plot)`: redraws the curves of `keys` (train
  and eval scalars) in one output area as training logs them, at most every
  `min_interval_s` seconds; `plot.show()` draws the final state."""

  def __init__(self, keys: Sequence[str], title: str = '',
               min_interval_s: float = 2.0):
    self.keys, self.title = tuple(keys), title
    self.min_interval_s = min_interval_s
    self.history: dict[str, list[tuple[int, float]]] = {k: [] for k in self.keys}
    self._handle = None
    self._last = 0.0

  def __call__(self, step: int, record: Mapping[str, float]) -> None:
    for k in self.keys:
      if k in record and np.isfinite(record[k]):
        self.history[k].append((step, float(record[k])))
    if time.monotonic() - self._last >= self.min_interval_s:
      self.show()

  def figure(self):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(4 * len(self.keys), 3))
    axes = fig.subplots(1, len(self.keys), squeeze=False)[0]
    for ax, k in zip(axes, self.keys):
      if self.history[k]:
        steps, values = zip(*self.history[k])
        ax.plot(steps, values, marker='.' if len(steps) < 30 else None)
      ax.set_title(k, fontsize=9)
      ax.set_xlabel('step')
      ax.grid(alpha=0.3)
    if self.title:
      fig.suptitle(self.title)
    fig.tight_layout()
    return fig

  def show(self) -> None:
    self._last = time.monotonic()
    self._handle = _display(self.figure(), self._handle)


def _audio_html(wave: np.ndarray, sample_rate: int) -> str:
  from IPython.display import Audio
  wave = np.clip(np.asarray(wave, np.float32), -1.0, 1.0)
  data = wave.T if wave.ndim == 2 else wave     # Audio wants [channels, T]
  return Audio(data, rate=sample_rate, normalize=False)._repr_html_()


def players(waves: Mapping[str, np.ndarray], sample_rate: int) -> Any:
  """A row of labelled audio players ([T] or [T, C] waves), side by side."""
  from IPython.display import HTML
  cells = ''.join(
      f'<td style="padding:4px 12px;text-align:center"><b>{html.escape(name)}'
      f'</b><br>{_audio_html(w, sample_rate)}</td>'
      for name, w in waves.items())
  return HTML(f'<table><tr>{cells}</tr></table>')


class StreamPlayer:
  """A generation streaming callback: each call replaces one output area with
  the audio generated so far, so it can be played while the rest generates.
  `decode(frames)` turns codes [F, K] into a wave [T, C]."""

  def __init__(self, decode, sample_rate: int):
    self.decode, self.sample_rate = decode, sample_rate
    self.calls: list[int] = []
    self._handle = None

  def __call__(self, frames: np.ndarray, counts: np.ndarray) -> None:
    n = int(np.asarray(counts)[0])
    self.calls.append(n)
    if n == 0:
      return
    wave = self.decode(np.asarray(frames)[0, :n])
    self._handle = _display(players(
        {f'{n} frames so far': wave}, self.sample_rate), self._handle)


# ------------------------------------------------------- shared model runs
def codec_config():
  """The notebooks' codec: configs/codec/tiny.py with quantizer dropout (so
  it also decodes from fewer codebooks) and quick or full step counts."""
  from musicjax import config as config_lib
  steps = choose(quick=30, full=1500)
  every = choose(quick=steps, full=500)
  return config_lib.load(config_path('codec', 'tiny.py'), [
      # Quick: 2 train and 2 eval chorales (the accompaniment metrics compare
      # a song with another held-out one, so they need two).
      f'data.max_pieces={choose(quick=4, full=40)}',
      f'data.eval_every_nth_bwv={choose(quick=2, full=10)}',
      f'train.steps={steps}', f'train.log_every={choose(quick=5, full=25)}',
      f'train.eval_every={every}', f'train.checkpoint_every={every}',
      'model.rvq.quantizer_dropout=0.5'])


def ensure_codec(on_log=None):
  """(config, workdir) of the notebooks' codec run: notebook 1's, finished
  here if it is missing or partly trained."""
  from musicjax.train import trainer
  config, workdir = codec_config(), runs_dir('codec')
  trainer.train(config, workdir, on_log=on_log)
  return config, workdir


def ensure_tokens():
  """Token shards (mix and stems) of the chorales, encoded with the notebooks'
  codec: the data of the LM (notebook 2) and the accompaniment model
  (notebook 3). Encoding resumes where it stopped."""
  from musicjax.prepare import tokens as prepare_tokens
  config, workdir = ensure_codec()
  out = runs_dir('tokens')
  prepare_tokens.prepare_tokens_main(workdir, out, config, stems=True)
  return out
