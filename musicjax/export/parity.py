"""One forward pass in JAX and in PyTorch on an export, side by side (the
demo's check that an export loads and computes the same thing).

Needs torch and musicjax_torch (`pip install -e '.[torch]'`)."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from musicjax.accomp import model as model_lib


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def codec(model, export_dir: str, audio: np.ndarray) -> dict[str, Any]:
  """Codes and decoded audio of `audio` [T, C] through both frameworks."""
  # Deferred here and below: torch is an optional extra ('.[torch]').
  import torch  # pylint: disable=g-import-not-at-top
  import musicjax_torch  # pylint: disable=g-import-not-at-top
  tm = musicjax_torch.from_pretrained(export_dir).eval()
  x = audio[None].astype(np.float32)
  codes = np.asarray(jax.jit(model.encode)(x))
  wave = np.asarray(jax.jit(model.decode)(codes))
  with torch.no_grad():
    t_codes = tm.encode(torch.from_numpy(x)).numpy()
    t_wave = tm.decode(torch.from_numpy(codes.astype(np.int64))).numpy()
  return {'codes_equal': bool(np.array_equal(codes, t_codes)),
          'codes_agree_fraction': float(np.mean(codes == t_codes)),
          'decoded_max_rel_error': _rel(t_wave, wave)}


def lm(model, export_dir: str, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """Teacher-forced logits of one training batch through both frameworks."""
  import torch  # pylint: disable=g-import-not-at-top
  import musicjax_torch  # pylint: disable=g-import-not-at-top
  tm = musicjax_torch.from_pretrained(export_dir).eval()
  out = jax.jit(lambda b: model(b))(batch)
  with torch.no_grad():
    t_out = tm({k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()})
  key = 'stream' if 'stream' in out else 'global'
  return {'logits': key,
          'logits_max_rel_error': _rel(t_out[key].numpy(), out[key])}


def accomp(model, export_dir: str, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """Logits of one batch (accompaniment half masked, both prefixes used)
  through both frameworks."""
  import torch  # pylint: disable=g-import-not-at-top
  import musicjax_torch  # pylint: disable=g-import-not-at-top
  tm = musicjax_torch.from_pretrained(export_dir).eval()
  b = {k: np.asarray(v) for k, v in batch.items()}
  n = b['valid'].shape[0]
  tv = b['valid'][..., None] & (b['accomp'] >= 0)
  half = np.arange(b['accomp'].shape[1])[None, :, None] % 2 == 0
  inp = np.where(tv, b['accomp'], model_lib.pad_id(model.codebook_size))
  inp = np.where(half & tv, model_lib.mask_id(model.codebook_size), inp)
  keep = np.ones((n,), bool)
  text_valid = np.any(b['text'] >= 0, axis=1)

  def run_jax(m):
    pre = m.prefix(b['text'], text_valid, b['ref'], b['ref_valid'], keep, keep)
    return m.logits(m.hidden(b['vocal'], inp, b['valid'], pre))

  out = np.asarray(jax.jit(run_jax)(model))
  t = lambda x: torch.from_numpy(np.asarray(x))
  with torch.no_grad():
    pre = tm.prefix(t(b['text']), t(text_valid), t(b['ref']), t(b['ref_valid']),
                    t(keep), t(keep))
    t_out = tm.logits(tm.hidden(t(b['vocal']), t(inp), t(b['valid']), pre))
  return {'logits_max_rel_error': _rel(t_out.numpy(), out)}
