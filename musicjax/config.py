"""Loading, overriding and validating ml_collections configs.

A config file is a Python file with `get_config()` returning a ConfigDict built
on `base_config()`. Every key a run may read exists in the file (the schema is
base_config() plus the task's `default_config()`), so a typo in a file or in a
`--config.a.b=value` override fails before anything compiles, naming the key.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import json
import os
from typing import Any, Iterable

import ml_collections

from musicjax import tasks as tasks_lib
# ConfigError lives in errors.py (no imports), so low layers can raise it;
# `from musicjax.config import ConfigError` keeps working for everyone else.
from musicjax.errors import ConfigError  # pylint: disable=unused-import

ConfigDict = ml_collections.ConfigDict


def base_config() -> ConfigDict:
  """Keys every training config has. Their names are stable (docs/configs.md)."""
  c = ConfigDict()
  c.task = 'codec'

  c.data = ConfigDict()
  c.data.kind = 'chorales'          # chorales | folder | array_record | tfds
  c.data.path = ''                  # folder / array_record glob / tfds data_dir
  c.data.cache_dir = '~/.cache/musicjax'
  c.data.max_pieces = 0             # chorales: use at most this many pieces (0 = all)
  c.data.eval_every_nth_bwv = 10    # chorales: BWV numbers divisible by this go to eval
  c.data.eval_fraction = 0.1        # folder / array_record: share of files for eval (by path hash)
  c.data.sample_rate = 24000
  c.data.channels = 1
  c.data.segment_seconds = 1.0
  c.data.batch_size = 8             # global batch, over all processes
  c.data.eval_batch_size = 8
  c.data.num_workers = 0            # Grain worker processes (0 = in-process)
  c.data.max_file_seconds = 1200.0  # longer files are reported and skipped
  c.data.render_tempo_bpm = 80.0    # chorales: quarter-note tempo for rendering
  c.data.shuffle_seed = 0
  c.data.records_per_shard = 256    # `musicjax prepare`: audio records per ArrayRecord shard
  # `musicjax prepare --codec-workdir`: audio augmentation before the codec
  # runs (models train on tokens; musicjax/data/augment.py).
  c.data.augment = ConfigDict()
  # --stems: frequency-balance (EQ) copies of each accompaniment, stored as
  # accompaniment_eq_codes [N, F, K] (seed 003 A.2; 0 = none).
  c.data.augment.eq_copies = 0
  # Tempo factors a tempo copy draws from (seed 003 A.2: x0.8/0.9/1.1/1.2).
  c.data.augment.stretch_rates = (0.8, 0.9, 1.1, 1.2)
  # Semitones a pitch copy draws from (seed 003 A.2: +-1, +-2).
  c.data.augment.pitch_steps = (-2, -1, 1, 2)
  # Share of train songs that get one tempo and one pitch copy (paper 0.2).
  c.data.augment.speed_pitch_fraction = 0.0

  c.mesh = ConfigDict()
  c.mesh.data = -1                  # -1 fills the rest of the devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # auto: XLA's partitioner places gathers for sharded weights by itself. explicit
  # (jax.sharding.AxisType.Explicit) makes shardings part of types; model code
  # must then reshard weights itself (musicjax.parallel.rules.shard_activation).
  c.mesh.axis_type = 'auto'

  # Ordered logical-axis -> mesh-axis rules (MaxText style). First free match wins.
  c.sharding = ConfigDict()
  c.sharding.rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('conv_in', 'fsdp'),
      ('conv_out', 'tensor'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('vocab', 'tensor'),
      ('codebook', None),
      ('time', None),
      ('layers', None),
  )

  c.train = ConfigDict()
  c.train.steps = 1000
  c.train.seed = 0
  c.train.log_every = 50
  c.train.eval_every = 500           # 0: never evaluate (the eval split is not needed)
  c.train.eval_steps = 4
  c.train.checkpoint_every = 500
  c.train.max_nonfinite = 10
  # Steps (and eval batches) dispatched ahead of the host before it waits. Two
  # hide dispatch on accelerators; an unbounded queue on XLA:CPU with several
  # devices in one process deadlocks in its collectives (seen on jax 0.10.2).
  c.train.max_inflight_steps = 2
  c.train.summary_every = 0         # audio / image summaries (0 = at eval only)
  c.train.eval_at_start = False     # also evaluate the initial state (logged at step 0)
  # Micro-batches per step: the step's gradient is the whole batch's (exactly,
  # musicjax/train/accumulate.py) with one micro-batch's activations live.
  c.train.grad_accum = 1

  # Warm start (musicjax/train/warm_start.py, docs/training.md): a fresh run
  # starts from the weights of another run's latest checkpoint (or an import);
  # a resumed run ignores this section.
  c.init = ConfigDict()
  c.init.workdir = ''
  c.init.model_changes = ()         # config.model keys that may differ from that run
  c.init.new_params = ()            # path patterns ('model/uncond*') of weights it lacks

  # LoRA / QLoRA (musicjax/nn/lora.py, docs/finetune.md): adapters on the
  # weights `targets` names train; everything else stays as `init.workdir`
  # has it, and checkpoints hold only the adapters and their optimizer.
  c.lora = ConfigDict()
  c.lora.rank = 0                   # 0: no adapters (full fine-tuning)
  c.lora.alpha = 16.0               # the update is alpha / rank * A @ B
  # fnmatch patterns over weight paths (`musicjax lora-targets` lists them).
  c.lora.targets = ('*/attn/wq', '*/attn/wk', '*/attn/wv', '*/attn/wo')
  c.lora.base = 'float'             # float | int8 | int4: the frozen base (QLoRA)
  c.lora.int4_group = 128           # int4: contracted values sharing one scale

  c.checkpoint = ConfigDict()
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.model = ConfigDict()
  c.optim = ConfigDict()
  c.loss = ConfigDict()
  return c


def shipped_dir() -> str | None:
  """The folder of the configs musicjax ships (configs/ of the repo).

  A wheel carries them as package data in musicjax/configs/ (pyproject.toml
  maps the repo's top-level configs/ there); a source checkout or an editable
  install reads the repo's configs/ itself.
  """
  here = os.path.dirname(os.path.abspath(__file__))
  for d in (os.path.join(here, 'configs'),
            os.path.join(os.path.dirname(here), 'configs')):
    if os.path.isdir(d):
      return d
  return None


def shipped_names() -> list[str]:
  """Names of the shipped configs, e.g. ['accomp/tiny', ..., 'lm/tiny']."""
  root = shipped_dir()
  if root is None:
    return []
  names = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(('_', '.')))
    for f in filenames:
      if f.endswith('.py') and not f.startswith('_'):
        rel = os.path.relpath(os.path.join(dirpath, f), root)
        names.append(rel[:-3].replace(os.sep, '/'))
  return sorted(names)


def _split_arg(spec: str) -> tuple[str, str | None]:
  """'path.py:arg' -> ('path.py', 'arg'); a spec without one -> (spec, None).

  The argument is everything after the first colon (it may hold more colons
  or slashes); an existing file whose name has a colon stays whole.
  """
  if os.path.isfile(spec) or ':' not in spec:
    return spec, None
  path, arg = spec.split(':', 1)
  return path, arg


def resolve(spec: str) -> str:
  """The file a --config value names (without any ':arg').

  An existing file path wins; otherwise `spec` names a shipped config:
  'lm/tiny', 'lm/tiny.py' and 'configs/lm/tiny.py' all name configs/lm/tiny.py,
  so the documented commands work from any directory after `pip install`.

  Raises:
    ConfigError: for an unknown name, listing the shipped configs (closest first).
  """
  if os.path.isfile(spec):
    return spec
  name = spec.replace(os.sep, '/').removesuffix('.py')
  while name.startswith('./'):
    name = name[2:]
  name = name.removeprefix('configs/')
  root = shipped_dir()
  names = shipped_names()
  if root is not None and name in names:
    return os.path.join(root, *name.split('/')) + '.py'
  # Spelling slips (lm/tinny), then the same file in another folder (tiny).
  close = difflib.get_close_matches(name, names, n=3, cutoff=0.8)
  leaf = name.split('/')[-1]
  close += [n for n in names if n.split('/')[-1] == leaf and n not in close]
  hint = f' (did you mean {" or ".join(close)}?)' if close else ''
  available = ', '.join(names) if names else 'none found'
  raise ConfigError(
      f'config file not found: {spec}, and it is not the name of a shipped '
      f'config{hint}. Pass a path to a config file, or one of: {available}')


def _takes_arg(fn) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
             for p in params)


def _needs_arg(fn) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
             and p.default is p.empty for p in params)


def _load_file(spec: str) -> ConfigDict:
  """Runs get_config() of the config `spec` names: a path or a shipped name,
  optionally with ':arg', passed as get_config(arg) (big_vision style)."""
  spec_path, arg = _split_arg(spec)
  path = resolve(spec_path)
  module_name = '_musicjax_config'
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  mod = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(mod)
  except SyntaxError as e:
    raise ConfigError(f'{path}: syntax error in the config file: {e}') from e
  if not hasattr(mod, 'get_config'):
    raise ConfigError(f'{path} has no get_config() function')
  get_config = mod.get_config
  if arg is not None and not _takes_arg(get_config):
    raise ConfigError(
        f'--config {spec}: {path} has get_config() without a parameter, so it '
        f'takes no ":{arg}" argument; pass --config {spec_path}')
  if arg is None and _needs_arg(get_config):
    raise ConfigError(
        f'{path}: get_config() needs an argument: pass --config {spec_path}:ARG '
        '(the text after the colon is passed to get_config)')
  try:
    return get_config(arg) if arg is not None else get_config()
  except (TypeError, AttributeError, KeyError) as e:
    # ConfigDict type-checks assignments; its message names the field.
    raise ConfigError(f'{path}: get_config() failed: {e}') from e


def _flatten(c: Any, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in c.items():
    key = f'{prefix}{k}'
    if isinstance(v, (ConfigDict, dict)) and not (isinstance(v, dict) and not v):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def _parse_value(key: str, text: str, current: Any) -> Any:
  if isinstance(current, bool):
    low = text.lower()
    if low in ('1', 'true', 'yes'):
      return True
    if low in ('0', 'false', 'no'):
      return False
    raise ConfigError(f'config.{key}: expected a bool, got {text!r}')
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(
        f'config.{key}: cannot parse {text!r} as {type(current).__name__}') from None
  return value


def _check_type(key: str, value: Any, current: Any) -> Any:
  if current is None or value is None:
    return value
  if isinstance(current, bool) != isinstance(value, bool):
    raise ConfigError(f'config.{key}: expected {type(current).__name__}, '
                      f'got {type(value).__name__} ({value!r})')
  if isinstance(current, float) and isinstance(value, int):
    return float(value)
  if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
    return type(current)(value)
  if not isinstance(value, type(current)):
    raise ConfigError(f'config.{key}: expected {type(current).__name__}, '
                      f'got {type(value).__name__} ({value!r})')
  return value


def _did_you_mean(key: str, known: Iterable[str]) -> str:
  """' (did you mean config.a.b?)' for the known keys closest to `key`, or ''."""
  known = list(known)
  # Spelling slips (train.setps, trian.steps), then the same leaf in another
  # section (--config.steps=... for train.steps).
  close = difflib.get_close_matches(key, known, n=3, cutoff=0.8)
  leaf = key.split('.')[-1]
  close += [k for k in known if k.split('.')[-1] == leaf and k not in close]
  if not close:
    return ''
  return f' (did you mean {" or ".join(f"config.{k}" for k in close)}?)'


def apply_overrides(config: ConfigDict, overrides: Iterable[str]) -> ConfigDict:
  """Applies `a.b=value` strings (the `--config.` prefix already removed)."""
  flat = _flatten(config)
  for item in overrides:
    if '=' not in item:
      # A bare bool key is True (`--config.train.eval_at_start`, as absl does).
      key = item.removeprefix('--').removeprefix('config.')
      if not isinstance(flat.get(key), bool):
        raise ConfigError(f'override {item!r} must look like --config.a.b=value '
                          'or --config.a.b value')
      item = f'{key}=true'
    key, text = item.split('=', 1)
    key = key.removeprefix('--').removeprefix('config.')
    if key not in flat:
      raise ConfigError(f'unknown config key config.{key}{_did_you_mean(key, flat)}')
    value = _check_type(key, _parse_value(key, text, flat[key]), flat[key])
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    with node.unlocked():
      node[leaf] = value
    flat[key] = value
  return config


def validate(config: ConfigDict, schema: ConfigDict) -> None:
  """Every key in `config` exists in `schema` with a compatible type."""
  flat_s = _flatten(schema)
  flat_c = _flatten(config)
  for key, value in flat_c.items():
    if key not in flat_s:
      raise ConfigError(f'unknown config key config.{key} (not in the schema of '
                        f'task {config.get("task")!r})'
                        f'{_did_you_mean(key, flat_s)}')
    _check_type(key, value, flat_s[key])
  for key in flat_s:
    if key not in flat_c:
      raise ConfigError(f'config.{key} is missing')
  positive = ['data.sample_rate', 'data.batch_size', 'data.eval_batch_size',
              'train.steps', 'train.log_every', 'train.checkpoint_every',
              'train.max_nonfinite', 'train.max_inflight_steps',
              'train.grad_accum', 'checkpoint.keep']
  for key in positive:
    if key in flat_c and not flat_c[key] > 0:
      raise ConfigError(f'config.{key} must be > 0, got {flat_c[key]!r}')
  if flat_c.get('train.eval_every', 0) < 0:
    raise ConfigError('config.train.eval_every must be >= 0 (0: never evaluate), '
                      f'got {flat_c["train.eval_every"]!r}')
  if flat_c.get('data.segment_seconds', 1.0) <= 0:
    raise ConfigError('config.data.segment_seconds must be > 0')
  if config.mesh.axis_type not in ('explicit', 'auto'):
    raise ConfigError(f"config.mesh.axis_type must be 'explicit' or 'auto', "
                      f'got {config.mesh.axis_type!r}')
  for axis in ('data', 'fsdp', 'tensor'):
    v = config.mesh[axis]
    if v != -1 and v < 1:
      raise ConfigError(f'config.mesh.{axis} must be -1 or >= 1, got {v}')


def for_task(task: str) -> ConfigDict:
  """base_config() with `task` set and that task's default sections merged in.

  Config files start from this; it is also the schema that validates them.
  """
  config = base_config()
  config.task = task
  for section, sub in tasks_lib.get(task).default_config().items():
    with config.unlocked():
      if isinstance(sub, ConfigDict) and section in config and isinstance(
          config[section], ConfigDict):
        config[section].update(sub)
      else:
        config[section] = sub
  return config


def schema_for(config: ConfigDict) -> ConfigDict:
  return for_task(config.task)


def load(path: str, overrides: Iterable[str] = ()) -> ConfigDict:
  """Loads a config, applies overrides, validates it against its schema.

  `path` is a config file, or the name of a shipped config ('lm/tiny'), either
  optionally followed by ':arg' for a get_config(arg) (resolve()).
  """
  config = _load_file(path)
  config = apply_overrides(config, overrides)
  validate(config, schema_for(config))
  return config


def save(config: ConfigDict, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json(indent=2))
  os.replace(tmp, path)
  return path


# How messages name the run each task trains, the configs/ folder of its
# configs, and a command that trains one.
_RUN_KINDS = {
    'codec': ('a codec run', 'codec',
              'musicjax train --config configs/codec/tiny.py --workdir runs/codec'),
    'lm': ('an LM run', 'lm',
           'musicjax train --config configs/lm/tiny.py --workdir runs/lm '
           '--config.data.path=data/tokens'),
    'lm_dpo': ('a DPO-tuned LM run', 'lm',
               'musicjax train --config configs/lm/dpo_tiny.py --workdir runs/dpo'),
    'accomp': ('an accompaniment run', 'accomp',
               'musicjax train --config configs/accomp/tiny.py --workdir '
               'runs/accomp'),
}


def run_kind(task: str) -> str:
  """'a codec run', 'an LM run', ...: what a user calls a run of `task`."""
  return _RUN_KINDS[task][0] if task in _RUN_KINDS else f'a {task!r} run'


def saved_task(workdir: str) -> str | None:
  """config.task of the run in `workdir` (its config.json); None without one."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, ValueError):
    return None  # load_saved reports a missing or broken config.json
  # load_saved's default: runs saved before `task` existed are codecs.
  return raw.get('task', 'codec') if isinstance(raw, dict) else None


def how_to_train(task: str) -> str:
  """'a run trained with a configs/lm/ config, e.g. `musicjax train ...`'."""
  _, family, example = _RUN_KINDS.get(task, ('', task, ''))
  return (f'a run trained with a configs/{family}/ config'
          + (f', e.g. `{example}`' if example else ''))


def require_task(config: ConfigDict, workdir: str, tasks: Iterable[str],
                 verb: str | None = None, flag: str = '--workdir') -> None:
  """Fails early unless the run in `workdir` and `config` are of one of `tasks`.

  A verb given another kind of run would otherwise fail later, while restoring
  it or reading its data, with a message that names neither kind of run.

  Args:
    config: the config the verb runs with (the run's own, or --config).
    workdir: the run directory.
    tasks: the tasks the verb accepts; the first one names the kind needed.
    verb: the `musicjax` verb, for the message (None: not named).
    flag: what the user called `workdir` ('--workdir', 'config.init.workdir').

  Raises:
    ConfigError: naming the kind of run given, the kind needed and the fix.
  """
  tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
  need = (f'{run_kind(tasks[0])} (config.task '
          f'{" or ".join(repr(t) for t in tasks)})')
  needs = f'`musicjax {verb}` needs {need}' if verb else f'{need} is needed'
  _, family, _ = _RUN_KINDS.get(tasks[0], ('', tasks[0], ''))
  saved = saved_task(workdir)
  if saved is not None and saved not in tasks:
    raise ConfigError(
        f'{flag} {workdir} is {run_kind(saved)} (config.task {saved!r} in '
        f'{os.path.join(workdir, "config.json")}), but {needs}: point {flag} '
        f'at {how_to_train(tasks[0])}')
  if config.task not in tasks:
    raise ConfigError(
        f'the config given for {flag} {workdir} has config.task '
        f'{config.task!r} ({run_kind(config.task)}), but {needs}: pass '
        f'a configs/{family}/ config, or leave out --config to use the run\'s '
        'own config.json')


def load_saved(workdir: str, overrides: Iterable[str] = ()) -> ConfigDict:
  """The config a run in `workdir` was trained with."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ConfigError(f'{path} not found: is {workdir} a musicjax training '
                      'workdir? Train first with `musicjax train`.')
  with open(path) as f:
    raw = json.load(f)
  task = raw.get('task', 'codec')
  schema = schema_for(ConfigDict({'task': task}))
  # JSON has no tuples; restore them before ConfigDict fixes each field's type.
  for key, value in _flatten(schema).items():
    if isinstance(value, tuple):
      node = raw
      *parents, leaf = key.split('.')
      for p in parents:
        node = node.get(p, {})
      if isinstance(node.get(leaf), list):
        node[leaf] = _to_tuple(node[leaf])
  # Keys added to the schema after the run was saved take their defaults
  # (new keys default to the old behaviour), so upgrading musicjax never
  # strands a finished run. Where new configs default to something else, the
  # task names the old behaviour (Task.saved_config_defaults).
  old = dict(tasks_lib.get(task).saved_config_defaults())
  for key, value in _flatten(schema).items():
    node = raw
    *parents, leaf = key.split('.')
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        break
    else:
      if leaf not in node:
        value = old.get(key, value)
        node[leaf] = value.to_dict() if isinstance(value, ConfigDict) else value
  config = ConfigDict(raw)
  config = apply_overrides(config, overrides)
  validate(config, schema)
  return config


def _to_tuple(v: Any) -> Any:
  if isinstance(v, list):
    return tuple(_to_tuple(x) for x in v)
  return v


def flatten(c: ConfigDict) -> dict[str, Any]:
  """{'a.b.c': value} for every leaf of a (nested) config."""
  return _flatten(c)
