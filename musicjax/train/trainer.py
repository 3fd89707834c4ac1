"""The one generic training loop for every task (see musicjax/train/task.py).

The trainer owns the mesh, sharding, jit, data iteration, checkpoints, metrics,
preemption and the non-finite guard; it never looks inside a task.

* State: `task.create_state` is evaluated abstractly, split once into
  (graphdef, state), and the state's shardings come from the logical-axis rules.
  The jitted step merges, calls `task.train_step`, and returns the new state.
* Resume is exact: the step rng is `fold_in(key(seed), step)`, the Grain
  iterator state is checkpointed with the model, and so are the non-finite
  counters; metrics.jsonl lines past the restored step are dropped.
* Device->host syncs happen only at log / checkpoint / eval steps; per-step
  metrics stay on device until then.
* Preemption: SIGTERM sets a flag; the current step finishes, a checkpoint is
  saved at that step, and `train` returns normally (exit 0). With several
  processes the flag is all-gathered every step, so all agree on the stop step.
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import time
import traceback
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from musicjax import config as config_lib
from musicjax import tasks
from musicjax.config import ConfigError
from musicjax.data import audio
from musicjax.errors import UserError
from musicjax.nn import lora
from musicjax.parallel import distributed
from musicjax.parallel import mesh as mesh_lib
from musicjax.parallel import rules as rules_lib
from musicjax.train import adapter_runs
from musicjax.train import checkpoint as ckpt_lib
from musicjax.train import metrics as metrics_lib
from musicjax.train import progress


class NonFiniteError(UserError, RuntimeError):
  """Too many consecutive non-finite steps; the last good checkpoint is kept."""


@dataclasses.dataclass
class Setup:
  """Everything derived from a config before any real array exists."""
  config: ml_collections.ConfigDict
  task: Any
  mesh: Mesh
  rules: rules_lib.Rules
  graphdef: Any
  abstract_state: nnx.State
  state_shardings: Any
  batch_shardings: dict[str, NamedSharding]
  eval_batch_shardings: dict[str, NamedSharding]
  # What checkpoints leave out: a LoRA run's frozen base (adapter_runs.py).
  leave_out: frozenset = frozenset()


def _log(msg: str) -> None:
  if distributed.is_primary():
    print(msg, file=sys.stderr, flush=True)


def validate_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Batch sizes must split evenly over data-parallel devices and processes."""
  dp = mesh_lib.data_parallel_size(mesh)
  pc = jax.process_count()
  if dp % pc:
    raise ConfigError(
        f'config.mesh: data x fsdp = {dp} must be a multiple of the {pc} '
        'processes, so that each process loads a distinct part of the batch')
  for key in ('batch_size', 'eval_batch_size'):
    b = int(config.data[key])
    if b % dp:
      raise ConfigError(
          f'config.data.{key}={b} is not divisible by the data-parallel size '
          f'{dp} (config.mesh.data x config.mesh.fsdp = '
          f'{mesh.shape["data"]} x {mesh.shape["fsdp"]})')
    if b % pc:
      raise ConfigError(f'config.data.{key}={b} is not divisible by the '
                        f'{pc} processes')
  n, b = int(config.train.grad_accum), int(config.data.batch_size)
  if b % (n * dp):
    raise ConfigError(
        f'config.data.batch_size={b} is not divisible by config.train.'
        f'grad_accum={n} x the data-parallel size {dp}: each of the {n} '
        'micro-batches must split evenly over the devices')


def _create_state_fn(task, seed: int):
  def create():
    # Placement comes from out_shardings; no eager sharding inside creation.
    with nnx.use_eager_sharding(False):
      return nnx.state(task.create_state(nnx.Rngs(seed)))
  return create


def setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """Builds task, mesh and all shardings; every config error surfaces here.

  `devices` (default: all) is for tests comparing meshes in one process.
  """
  task = tasks.get(config.task)(config)
  rules = rules_lib.normalize_rules(config.sharding.rules)
  if config.train.grad_accum > 1 and not task.supports_grad_accum:
    raise ConfigError(
        f'config.train.grad_accum={config.train.grad_accum}: task '
        f'{config.task!r} does not accumulate gradients (the lm, lm_dpo and '
        'accomp tasks do); set --config.train.grad_accum=1')
  adapter_runs.check(task)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  validate_batch(config, mesh)
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(
        lambda: task.create_state(nnx.Rngs(config.train.seed)))
  graphdef, abstract_state = nnx.split(abstract)
  state_sh = rules_lib.state_shardings(abstract_state, mesh, rules)
  batch_sh = rules_lib.batch_shardings(
      task.batch_spec(config.data.batch_size), mesh, rules)
  eval_sh = rules_lib.batch_shardings(
      task.batch_spec(config.data.eval_batch_size), mesh, rules)
  leave_out = (frozenset(adapter_runs.frozen_paths(
      abstract_state, task.warm_start_subtrees))
               if lora.enabled(config) else frozenset())
  return Setup(config, task, mesh, rules, graphdef, abstract_state, state_sh,
               batch_sh, eval_sh, leave_out)


def _select_tree(ok: jax.Array, new: Any, old: Any) -> Any:
  def sel(n, o):
    if n is o:   # untouched by the step (a LoRA run's frozen base)
      return n
    if jnp.issubdtype(n.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(
          jnp.where(ok, jax.random.key_data(n), jax.random.key_data(o)),
          impl=jax.random.key_impl(n))
    return jnp.where(ok, n, o)
  return jax.tree.map(sel, new, old)


def _all_finite(metrics: Mapping[str, jax.Array]) -> jax.Array:
  ok = jnp.array(True)
  for v in metrics.values():
    ok = ok & jnp.all(jnp.isfinite(v))
  return ok


def make_train_step(s: Setup):
  """jit(state, batch, step) -> (state, metrics, skipped); donates the state."""
  task, graphdef, seed = s.task, s.graphdef, s.config.train.seed
  repl = rules_lib.replicated(s.mesh)

  def step_fn(state, batch, step):
    old = jax.tree.map(lambda x: x, state)  # independent of in-place updates
    module = nnx.merge(graphdef, state)
    rng = jax.random.fold_in(jax.random.key(seed), step)
    metrics = task.train_step(module, batch, rng)
    ok = _all_finite(metrics)
    # Non-finite guard: keep the old state; the host counts the skip.
    new = _select_tree(ok, nnx.state(module), old)
    return new, metrics, ~ok

  return jax.jit(step_fn, in_shardings=(s.state_shardings, s.batch_shardings,
                                        repl),
                 out_shardings=(s.state_shardings, repl, repl),
                 donate_argnums=0)


def make_eval_step(s: Setup):
  task, graphdef = s.task, s.graphdef
  repl = rules_lib.replicated(s.mesh)

  def eval_fn(state, batch, rng):
    return task.eval_step(nnx.merge(graphdef, state), batch, rng)

  return jax.jit(eval_fn, in_shardings=(s.state_shardings,
                                        s.eval_batch_shardings, repl),
                 out_shardings=repl)


def global_batch(local: Mapping[str, np.ndarray], spec: Mapping[str, Any],
                 shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global jax.Arrays laid out by `shardings`."""
  pc = jax.process_count()
  out = {}
  for k, sp in spec.items():
    if k not in local:
      raise ValueError(f'dataset batch lacks {k!r} (batch_spec has '
                       f'{sorted(spec)}; got {sorted(local)})')
    x = np.asarray(local[k])
    want = (sp.shape[0] // pc,) + tuple(sp.shape[1:])
    if x.shape != want:
      raise ValueError(f'dataset batch[{k!r}] has shape {x.shape}, expected '
                       f'{want} (global {tuple(sp.shape)} over {pc} processes)')
    out[k] = jax.make_array_from_process_local_data(
        shardings[k], x.astype(sp.dtype, copy=False), tuple(sp.shape))
  return out


def _eval(s: Setup, eval_fn, state, num_batches: int) -> dict[str, float]:
  """Averages eval metrics over `num_batches` batches of a fresh eval iterator."""
  spec = s.task.batch_spec(s.config.data.eval_batch_size)
  it = iter(s.task.dataset('eval', jax.process_index(), jax.process_count()))
  key = jax.random.key(s.config.train.seed + 1)
  outs = []
  for i in range(num_batches):
    outs.append(eval_fn(state, global_batch(next(it), spec,
                                            s.eval_batch_shardings),
                        jax.random.fold_in(key, i)))
    _bound_inflight(outs, s.config.train.max_inflight_steps)
  return s.task.finalize_metrics(metrics_lib.average(jax.device_get(outs)))


def _bound_inflight(dispatched: list, limit: int) -> None:
  """Waits for the program `limit` places back in `dispatched` (device values
  in dispatch order), so at most `limit` are queued beyond the host.

  Why: jit calls return before the device finishes, and nothing else bounds
  the queue between two metric fetches. On XLA:CPU with several devices in one
  process, a few dozen queued programs with collectives deadlock (jax 0.10.2);
  elsewhere a deep queue only holds batches in memory longer.
  """
  if len(dispatched) > limit:
    jax.block_until_ready(dispatched[-1 - limit])


class _Preemption:
  """SIGTERM -> a flag checked once per step (the handler does nothing else)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. a notebook worker)
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
    return False

  def agreed(self) -> bool:
    """True on every process if any process got SIGTERM (one tiny all-gather)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(
        np.array([int(self.requested)], np.int32))
    return bool(np.max(flags))


@dataclasses.dataclass
class _Counters:
  nonfinite_skipped: int = 0
  nonfinite_consecutive: int = 0


def init_state(s: Setup) -> nnx.State:
  """Fresh sharded train state (run under `jax.set_mesh(s.mesh)`)."""
  init = jax.jit(_create_state_fn(s.task, s.config.train.seed),
                 out_shardings=s.state_shardings)
  return init()


def _restore(s: Setup, manager, step: int, workdir: str, data_iter=None
             ) -> nnx.State:
  """Checkpoint `step`; a LoRA run's frozen base comes from its init run."""
  if not lora.enabled(s.config):
    return ckpt_lib.restore(manager, step, s.abstract_state, s.state_shardings,
                            data_iter)
  with rules_lib.use_rules(s.rules):
    base = s.task.warm_start(init_state(s), s.state_shardings)
  adapter_runs.check_base(workdir, s.config.init.workdir,
                          s.task.warm_start_step)
  return ckpt_lib.restore(manager, step, s.abstract_state, s.state_shardings,
                          data_iter, base=base, leave_out=s.leave_out)


def _initial_state(s: Setup, manager, data_iter, workdir: str
                   ) -> tuple[Any, int, _Counters]:
  latest = manager.latest_step()
  if latest is None:
    state = s.task.warm_start(init_state(s), s.state_shardings)
    if lora.enabled(s.config):
      adapter_runs.record_base(workdir, s.config.init.workdir,
                               s.task.warm_start_step)
    return state, 0, _Counters()
  state = _restore(s, manager, latest, workdir, data_iter)
  meta = ckpt_lib.restore_meta(manager, latest)
  _log(f'resumed from checkpoint at step {latest}')
  return state, latest, _Counters(**meta)


def _drain(pending: list, window: list, counters: _Counters,
           max_nonfinite: int, workdir: str) -> None:
  """Fetches pending per-step outputs (one device->host transfer) and applies
  the non-finite policy: count and warn per skipped step, stop after
  `max_nonfinite` in a row. Finite steps' metrics go to the log `window`."""
  fetched = jax.device_get([(m, bad) for _, m, bad in pending])
  for (step, _, _), (m, bad) in zip(pending, fetched):
    if not bool(bad):
      counters.nonfinite_consecutive = 0
      window.append(m)
      continue
    counters.nonfinite_skipped += 1
    counters.nonfinite_consecutive += 1
    bad_keys = [k for k, v in m.items() if not np.all(np.isfinite(v))]
    _log(f'WARNING: non-finite {", ".join(bad_keys)} at step {step}; update '
         f'skipped ({counters.nonfinite_consecutive} in a row, '
         f'{counters.nonfinite_skipped} total)')
    if counters.nonfinite_consecutive >= max_nonfinite:
      raise NonFiniteError(
          f'{counters.nonfinite_consecutive} consecutive non-finite steps '
          f'(last at step {step}; config.train.max_nonfinite={max_nonfinite}): '
          f'stopping. The last good checkpoint in '
          f'{ckpt_lib.checkpoint_dir(workdir)} is kept.')
  pending.clear()


def train(config: ml_collections.ConfigDict, workdir: str,
          on_log: Callable[[int, dict[str, float]], None] | None = None
          ) -> dict[str, float]:
  """Trains (or resumes) `config` in `workdir`; returns the last logged scalars.

  `on_log(step, scalars)`, if given, runs on every process after each logged
  step (train and eval scalars), e.g. a notebook's live loss plot.
  """
  s = setup(config)
  c = config.train
  primary = distributed.is_primary()
  if primary:
    config_lib.save(config, workdir)
  manager = ckpt_lib.make_manager(workdir, config.checkpoint.keep,
                                  config.checkpoint.async_save)
  if manager.latest_step() is None:
    # A warm start's config errors come before anything is compiled.
    from musicjax.train import warm_start as warm_start_lib  # imports trainer
    try:
      warm_start_lib.plan(s.task, s.abstract_state)
    except BaseException:
      manager.close()
      raise
  spec = s.task.batch_spec(config.data.batch_size)
  data_iter = iter(s.task.dataset('train', jax.process_index(),
                                  jax.process_count()))
  writer = None
  last: dict[str, float] = {}
  try:
    with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules), \
        _Preemption() as preempt:
      state, start, counters = _initial_state(s, manager, data_iter, workdir)
      if primary:
        metrics_lib.truncate_jsonl(
            f'{workdir}/{metrics_lib.METRICS_FILE}', start)
      writer = metrics_lib.MetricWriter(workdir, enabled=primary)
      step_fn = make_train_step(s)
      eval_fn = make_eval_step(s)
      pending: list[tuple[int, Any, Any]] = []  # device values, not yet fetched
      window: list[dict] = []                     # fetched, finite steps
      evaluates = _check_eval_split(s, start)
      if start == 0 and c.eval_at_start and evaluates:
        # A baseline for "how much better did training make it".
        ev = _eval(s, eval_fn, state, c.eval_steps)
        record0 = {f'eval/{k}': v for k, v in ev.items()}
        writer.write_scalars(0, record0)
        _log('step 0 (before training): ' + ', '.join(
            f'{k} {v:.4g}' for k, v in sorted(record0.items())[:6]))
      t_window, n_window = time.perf_counter(), 0
      eta = progress.Eta(c.steps)  # starts once the first step (compile) is done
      step = start

      while step < c.steps:
        step += 1
        batch = global_batch(next(data_iter), spec, s.batch_shardings)
        state, m, bad = step_fn(state, batch, np.int32(step))
        pending.append((step, m, bad))
        if step == start + 1:
          bad.block_until_ready()  # the first step, compile included, is done
          eta.start(step)
        _bound_inflight(pending, c.max_inflight_steps)
        n_window += 1
        stop = preempt.agreed()
        is_log = step % c.log_every == 0 or step == c.steps or stop
        is_eval = evaluates and step % c.eval_every == 0
        is_ckpt = step % c.checkpoint_every == 0 or step == c.steps or stop
        is_summary = is_eval or (c.summary_every and step % c.summary_every == 0)
        record: dict[str, float] = {}
        if is_log or is_ckpt or is_eval:
          _drain(pending, window, counters, c.max_nonfinite, workdir)
        if is_log:
          now = time.perf_counter()
          record.update(s.task.finalize_metrics(metrics_lib.average(window))
                        if window else
                        {'loss': float('nan')})
          record['steps_per_sec'] = n_window / max(now - t_window, 1e-9)
          record['train/nonfinite_skipped'] = counters.nonfinite_skipped
          record['data/bad_files'] = _bad_file_count()
          if primary:
            progress.report(step, c.steps, record['steps_per_sec'], record,
                            keys=s.task.progress_metrics,
                            eta_seconds=eta.seconds_left(step))
          window.clear()
          t_window, n_window = now, 0
        t_extra, eta_extra = time.perf_counter(), eta.now()
        if is_eval:
          ev = _eval(s, eval_fn, state, c.eval_steps)
          record.update({f'eval/{k}': v for k, v in ev.items()})
        if is_summary:
          _write_summaries(s, state, step, writer)
        if record:
          writer.write_scalars(step, record)
          last = {'step': step, **record}
          if on_log is not None:
            on_log(step, record)
        if is_ckpt:
          ckpt_lib.save(manager, step, state, data_iter,
                        meta=dataclasses.asdict(counters), force=True,
                        leave_out=s.leave_out)
        if is_eval or is_summary or is_ckpt:
          # steps/s measures training only, not eval / summaries / saving.
          t_window += time.perf_counter() - t_extra
          eta.exclude(eta.now() - eta_extra)
        if stop:
          print(f'SIGTERM: saved a checkpoint at step {step}; exiting',
                file=sys.stderr, flush=True)  # every process says where it stopped
          break
  finally:
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()
  return last


def _check_eval_split(s: Setup, start: int) -> bool:
  """Whether this run (steps start+1 .. steps) evaluates; checks its data first.

  The eval dataset is built up front either way, so its bad files are named
  before training even when no evaluation follows. Data that cannot be
  evaluated stops the run here, before any compile, only when an evaluation
  (or a summary, which reads eval batches) would need it; otherwise it is a
  warning.
  """
  c = s.config.train
  evals = bool(c.eval_every) and c.steps // c.eval_every > start // c.eval_every
  summaries = bool(c.summary_every) and c.steps // c.summary_every > start // c.summary_every
  try:
    s.task.dataset('eval', jax.process_index(), jax.process_count())
  except UserError as e:
    if not (evals or summaries):
      _log(f'no evaluation in this run (config.train.eval_every='
           f'{c.eval_every}, steps {start + 1}..{c.steps}), so training goes on '
           f'without an eval split: {e}')
      return False
    raise UserError(
        f'{e}\nThis run evaluates (config.train.eval_every={c.eval_every}, '
        f'summary_every={c.summary_every}, steps {start + 1}..{c.steps}). Fix the '
        'eval split (add usable files, or raise config.data.eval_fraction), or '
        'train without evaluation: --config.train.eval_every=0') from None
  return evals


def _write_summaries(s: Setup, state, step: int, writer) -> None:
  """Task summaries on the first eval batch; every process runs the task's code
  (it may run sharded computations), only process 0 writes.

  Summaries are for looking at, not for training: one that fails is logged
  with its reason and where it was raised, and training goes on.
  """
  try:
    it = iter(s.task.dataset('eval', jax.process_index(), jax.process_count()))
    module = nnx.merge(s.graphdef, state)
    rng = jax.random.fold_in(jax.random.key(s.config.train.seed + 2), step)
    out = s.task.summaries(module, next(it), rng)
    if out:
      writer.write_summaries(step, out)
  except Exception as e:  # pylint: disable=broad-except
    where = traceback.extract_tb(e.__traceback__)[-1]
    _log(f'step {step}: summaries failed, training goes on: '
         f'{type(e).__name__}: {e} (at {where.filename}:{where.lineno} in '
         f'{where.name})')


def _bad_file_count() -> int:
  return int(audio.bad_file_count())   # counted by the data layer


def restore_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                       step: int | None = None):
  """(Setup, state, step) of the latest (or `step`) checkpoint in `workdir`.

  The low-level restore under `evaluate` and `musicjax.train.runs.load_run`
  (which checks the workdir first and names it in its errors).
  """
  s = setup(config)
  manager = ckpt_lib.make_manager(workdir, config.checkpoint.keep, False)
  try:
    step = ckpt_lib.latest_step_or_raise(manager, workdir, step)
    with jax.set_mesh(s.mesh):
      state = _restore(s, manager, step, workdir)
  finally:
    manager.close()
  return s, state, step


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             num_batches: int | None = None) -> dict[str, float]:
  """Eval metrics of the latest checkpoint: {'step': N, '<metric>': mean, ...}."""
  s, state, step = restore_checkpoint(config, workdir)
  n = num_batches or config.train.eval_steps
  with jax.set_mesh(s.mesh), rules_lib.use_rules(s.rules):
    ev = _eval(s, make_eval_step(s), state, n)
  return {'step': float(step), **ev}
