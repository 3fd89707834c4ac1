"""Reading the `.npz` records of musicjax's ArrayRecord shards from bytes.

numpy parses every `.npy` header with `ast.literal_eval`. On CPython 3.11,
AST construction racing in several threads (Grain's read threads decode
records concurrently) can raise a spurious `SystemError: AST constructor
recursion depth mismatch` (CPython gh-106905) on a perfectly good record.
Treating that as damage would silently drop a good song for the whole run, so
a `SystemError` is retried; real damage (truncated zip, bad header, bad JSON)
raises other types, deterministically, and is left to the caller to report.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

# A racing parse fails rarely (about once per few thousand decodes under
# load); three failures in a row on one record are not that race.
TRANSIENT_ATTEMPTS = 3


def load_npz(raw: bytes, keys: Sequence[str] | None = None
             ) -> dict[str, np.ndarray]:
  """The arrays of an `.npz` held in `raw` (all of them, or only `keys`),
  never unpickling. Raises what numpy raises for damaged bytes (KeyError for
  a missing key)."""
  for attempt in range(TRANSIENT_ATTEMPTS):
    try:
      with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return {k: z[k] for k in (z.files if keys is None else keys)}
    except SystemError:
      if attempt == TRANSIENT_ATTEMPTS - 1:
        raise
  raise AssertionError('unreachable')
