"""Reading and writing musicjax export directories (safetensors only).

The format (written by `musicjax export`, musicjax/export/files.py):
  * config.json: format 'musicjax-export', format_version, family, task,
    step, dtype, the JAX run's `model` config and loader facts;
  * model.safetensors, or shards model-0000i-of-0000N.safetensors plus
    model.safetensors.index.json ({"metadata": {"total_size": bytes},
    "weight_map": {tensor: file}}).
Tensors are read with safetensors; nothing is ever unpickled.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import re
from typing import Any, Mapping

import torch
from torch import nn

FORMAT = 'musicjax-export'
FORMAT_VERSION = 1
CONFIG = 'config.json'
SINGLE = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
README = 'README.md'
SHARD_RE = re.compile(r'model-\d{5}-of-\d{5}\.safetensors')
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
DEFAULT_MAX_SHARD_BYTES = 2 * 10 ** 9
# family -> (module, class); imported only when that family is loaded.
MODELS = {'codec': ('musicjax_torch.codec', 'Codec'),
          'lm': ('musicjax_torch.lm', 'AudioLM'),
          'accomp': ('musicjax_torch.accomp', 'AccompModel')}
# How many names an error lists before '...'.
NAMES_SHOWN = 5


class ExportError(ValueError):
  """A missing, corrupt or mismatched export file; the message names the
  file or tensor and the fix."""


# ------------------------------------------------------------------- config
def _dtype_name(dtype: str | torch.dtype) -> str:
  for name, dt in DTYPES.items():
    if dtype in (name, dt):
      return name
  raise ExportError(f'dtype must be one of {tuple(DTYPES)} (the dtypes the export '
                    f'format and `musicjax import-torch` know), got {dtype!r}')


def read_config(path: str) -> dict[str, Any]:
  """config.json of export directory `path`, with its format checked."""
  file = os.path.join(path, CONFIG)
  if not os.path.isfile(file):
    raise ExportError(f'{file}: missing; pass a directory written by `musicjax '
                      'export` or musicjax_torch.save_pretrained')
  try:
    with open(file) as f:
      meta = json.load(f)
  except ValueError as e:
    raise ExportError(f'{file}: not JSON ({e}); export again') from None
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    got = meta.get('format') if isinstance(meta, dict) else None
    raise ExportError(f'{file}: format {got!r} is not {FORMAT!r} (not a '
                      'musicjax export)')
  version = meta.get('format_version')
  if not isinstance(version, int) or isinstance(version, bool):
    raise ExportError(f'{file}: format_version {version!r} is not an integer')
  if version > FORMAT_VERSION:
    raise ExportError(f'{file}: format_version {version} is newer than this '
                      f'musicjax_torch reads ({FORMAT_VERSION}); upgrade '
                      'musicjax_torch')
  if meta.get('family') not in MODELS:
    raise ExportError(f'{file}: unknown family {meta.get("family")!r} (one of '
                      f'{tuple(MODELS)})')
  for key in ('model', 'dtype'):
    if key not in meta:
      raise ExportError(f'{file}: no {key!r} entry; export again')
  return meta


def model_class(family: str) -> type[nn.Module]:
  module, name = MODELS[family]
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError):
    raise NotImplementedError(
        f'musicjax_torch has no {family!r} model yet ({module}.{name} is '
        'missing); load this export in JAX with `musicjax import-torch`') from None


def build(meta: Mapping[str, Any]) -> nn.Module:
  """The untrained model an export's config.json describes."""
  cls = model_class(meta['family'])
  factory = getattr(cls, 'from_config', None)
  return factory(meta) if factory is not None else cls(meta)


# ------------------------------------------------------------------ tensors
def _open(file: str):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(file):
    raise ExportError(f'{file}: missing (was the export copied completely?)')
  if not os.access(file, os.R_OK):
    # Exports written before 2026-11-22 were 0600 (safetensors' own mode).
    raise ExportError(f'{file}: not readable by this user (mode '
                      f'{os.stat(file).st_mode & 0o777:o}); its owner can run '
                      f'chmod a+r {file}')
  try:
    return safe_open(file, framework='pt')
  except Exception as e:  # safetensors raises its own error types
    raise ExportError(f'{file}: not a readable safetensors file ({e}); it may '
                      'be truncated: copy or export it again') from None


def _weight_map(path: str) -> dict[str, str]:
  """{tensor: file name} from the index, or None for a single file."""
  index = os.path.join(path, INDEX)
  try:
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
  except (ValueError, KeyError, TypeError) as e:
    raise ExportError(f'{index}: not a safetensors index ({e}); export '
                      'again') from None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise ExportError(f'{index}: "weight_map" must map tensor names to file '
                      'names; export again')
  return weight_map


def read_tensors(path: str) -> dict[str, tuple[torch.Tensor, str]]:
  """{name: (tensor, file it came from)} of export directory `path`."""
  if os.path.isfile(os.path.join(path, INDEX)):
    weight_map = _weight_map(path)
  elif os.path.isfile(os.path.join(path, SINGLE)):
    weight_map = None
  else:
    raise ExportError(f'{path}: no {SINGLE} or {INDEX} (not an export '
                      'directory, or an incomplete copy)')
  files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
  out: dict[str, tuple[torch.Tensor, str]] = {}
  for fname in files:
    file = os.path.join(path, fname)
    with _open(file) as handle:
      have = set(handle.keys())
      want = have if weight_map is None else {
          n for n, f in weight_map.items() if f == fname}
      _check_index(want, have, file)
      for name in sorted(want):
        try:
          out[name] = (handle.get_tensor(name), file)
        except Exception as e:  # a damaged data section fails here
          raise ExportError(f'{file}: tensor {name!r} unreadable ({e}); copy '
                            'or export it again') from None
  return out


def _check_index(want: set[str], have: set[str], file: str) -> None:
  """The shard holds exactly the tensors the index puts in it."""
  if want - have:
    raise ExportError(f'{file}: tensors listed in {INDEX} are not in the file: '
                      f'{_names(want - have)} (an incomplete copy? export again)')
  if have - want:
    raise ExportError(f'{file}: tensors not listed in {INDEX}: '
                      f'{_names(have - want)} (the index and shards are from '
                      'different exports; export again)')


def _names(names) -> str:
  names = sorted(names)
  more = ' ...' if len(names) > NAMES_SHOWN else ''
  return ', '.join(repr(n) for n in names[:NAMES_SHOWN]) + more


def load_strict(model: nn.Module, tensors: Mapping[str, tuple[torch.Tensor, str]],
                path: str) -> None:
  """Copies every tensor into `model` (cast to its dtypes); any missing,
  unexpected or mis-shaped tensor is an error naming it and its file."""
  expected = model.state_dict()
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise ExportError(f'{path}: tensors the model needs are missing: '
                      f'{_names(missing)} (an export of another architecture, '
                      'or a damaged copy; export again)')
  unexpected = sorted(set(tensors) - set(expected))
  if unexpected:
    raise ExportError(f'{tensors[unexpected[0]][1]}: tensors the model does not '
                      f'have: {_names(unexpected)} (does config.json "model" '
                      'describe this export?)')
  for name, (t, file) in tensors.items():
    want = expected[name]
    if tuple(t.shape) != tuple(want.shape):
      raise ExportError(f'{file}: tensor {name!r} has shape {tuple(t.shape)}, '
                        f'the model expects {tuple(want.shape)} (does '
                        'config.json "model" describe this export?)')
    if t.is_floating_point() != want.is_floating_point():
      raise ExportError(f'{file}: tensor {name!r} is {t.dtype}, the model '
                        f'expects {want.dtype}')
  model.load_state_dict({n: t.to(expected[n].dtype) for n, (t, _) in
                         tensors.items()}, strict=True)


def from_pretrained(path: str, dtype: str | torch.dtype | None = None
                    ) -> nn.Module:
  """The model in export directory `path`, in eval mode.

  dtype: 'float32' / 'bfloat16' (or the torch dtype) for the floating
  tensors; None keeps the export's. The config.json is kept as
  `model.export_config` for save_pretrained.
  """
  meta = read_config(path)
  name = _dtype_name(meta['dtype'] if dtype is None else dtype)
  model = build(meta).to(DTYPES[name])
  load_strict(model, read_tensors(path), path)
  model.export_config = copy.deepcopy(meta)
  return model.eval()


# ------------------------------------------------------------------ writing
def _floating_dtype(state: Mapping[str, torch.Tensor]) -> str:
  kinds = {t.dtype for t in state.values() if t.is_floating_point()}
  if len(kinds) != 1:
    raise ExportError(f'the model mixes floating dtypes {sorted(map(str, kinds))}; '
                      'pass save_pretrained(..., dtype=) to pick one')
  return _dtype_name(kinds.pop())


def shard(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int
          ) -> list[list[str]]:
  """Names (sorted) grouped like the JAX writer: a new shard starts when the
  next tensor would pass max_shard_bytes."""
  shards: list[list[str]] = [[]]
  size = 0
  for n in sorted(tensors):
    nbytes = tensors[n].numel() * tensors[n].element_size()
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(n)
    size += nbytes
  return shards


def write_tensors(tensors: Mapping[str, torch.Tensor], path: str,
                  max_shard_bytes: int) -> list[str]:
  """Writes the weights files; returns their names (index last)."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  mask = os.umask(0o022)
  os.umask(mask)

  def save(names, fname):
    target = os.path.join(path, fname)
    save_file({n: tensors[n] for n in names}, target)
    # safetensors >= 0.8 writes 0600 whatever the umask: give the file the
    # mode open() would, so the rest of a team can read it.
    os.chmod(target, 0o666 & ~mask)

  groups = shard(tensors, max_shard_bytes)
  if len(groups) == 1:
    save(groups[0], SINGLE)
    return [SINGLE]
  written, weight_map = [], {}
  for i, group in enumerate(groups):
    fname = f'model-{i + 1:05d}-of-{len(groups):05d}.safetensors'
    save(group, fname)
    written.append(fname)
    weight_map.update({n: fname for n in group})
  total = int(sum(t.numel() * t.element_size() for t in tensors.values()))
  with open(os.path.join(path, INDEX), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f,
              indent=1, sort_keys=True)
  return written + [INDEX]


def _remove_stale(path: str, keep: list[str]) -> None:
  """Drops weights files of an earlier save that this one did not write (a
  stale index would otherwise win over a new single file)."""
  for fname in os.listdir(path):
    ours = fname in (SINGLE, INDEX) or SHARD_RE.fullmatch(fname)
    if ours and fname not in keep:
      os.remove(os.path.join(path, fname))


def save_pretrained(model: nn.Module, path: str,
                    dtype: str | torch.dtype | None = None,
                    max_shard_bytes: int | float = DEFAULT_MAX_SHARD_BYTES
                    ) -> list[str]:
  """Writes `model` as an export directory `musicjax import-torch` reads.

  The model must come from from_pretrained (its `export_config` is the
  config.json written back, with dtype and counts updated). dtype: that of
  the floating tensors in the files; None keeps the model's. Returns the
  file names written.
  """
  meta = getattr(model, 'export_config', None)
  if not isinstance(meta, dict):
    raise ExportError('save_pretrained needs a model from musicjax_torch.'
                      'from_pretrained (it has no export_config to write as '
                      'config.json)')
  state = {n: t.detach().cpu() for n, t in model.state_dict().items()}
  name = _floating_dtype(state) if dtype is None else _dtype_name(dtype)
  tensors = {n: (t.to(DTYPES[name]) if t.is_floating_point() else t).contiguous()
             for n, t in state.items()}
  os.makedirs(path, exist_ok=True)
  written = write_tensors(tensors, path, int(max_shard_bytes))
  _remove_stale(path, written)
  meta = dict(copy.deepcopy(meta), dtype=name, num_tensors=len(tensors),
              num_parameters=int(sum(t.numel() for t in tensors.values())))
  with open(os.path.join(path, CONFIG), 'w') as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  with open(os.path.join(path, README), 'w') as f:
    f.write(_readme(meta))
  return written + [CONFIG, README]


def _readme(meta: Mapping[str, Any]) -> str:
  return f"""# musicjax export: {meta['family']}

Saved by musicjax_torch.save_pretrained (task `{meta.get('task')}`, step
{meta.get('step', 0)}, weights in {meta['dtype']}; safetensors only).

```python
import musicjax_torch
model = musicjax_torch.from_pretrained('path/to/this/directory')
```

Back to JAX: `musicjax import-torch --from DIR --workdir RUN`.
"""
