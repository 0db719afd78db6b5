"""One training loop for every task: `train_and_evaluate(config, workdir)`.

The loop is the same for every task and imports nothing task-specific: the task
(`tasks.py`) says how a model is called on a batch, which targets count, and which evaluators
run after each evaluation. The steps below are written once: their per-device parts pmap-style,
the optimizer update on whole arrays; `parallel.py` runs them over the mesh that `config.mesh`
describes, data-parallel, with parameters sharded (FSDP), and with each sequence split over the
"context" axis (context parallelism: the steps run the model with its self-attention as a ring
over that axis, `context_model`, and the batches arrive split along their length, in zig-zag
order for a causal model, `context_order`).

The config travels in two hops: the ConfigDict (from an experiment file and the command line) is
checked whole by `prepare`, and `build_model(config.model)` turns its model fields into the
model's frozen config dataclass. Nothing is written to the workdir before `prepare` passes.

What lands in `workdir`:
  config.json        the config the run started with (a restart must match it)
  checkpoints/       Orbax checkpoints: train state and data-iterator position
  metrics.jsonl      train and eval metrics, one JSON object per line
  tensorboard/       the same as TensorBoard event files
  summary.json       written at the end: config, final and best metrics, speed, sizes, and
                     the machine and library versions (`provenance.py`)
"""

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer.data import with_overrides
from transformer.training import config_schema, parallel, provenance, tasks, workdir_lock
from transformer.training.checkpoints import (
    Checkpointer,
    check_compatible_config,
    check_resumable,
    write_json_atomically,
)
from transformer.training.metrics import MetricsWriter, read_metrics
from transformer.training.optimizer import learning_rate_schedule, make_optimizer


class TrainResult(NamedTuple):
    summary: dict  # what summary.json holds; "status" is "completed" or "stopped"
    state: Any  # the final TrainState, NumPy arrays on the host


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf."""


@flax.struct.dataclass
class TrainState:
    step: Any  # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any
    rng: Any  # uint32[2] raw PRNG key; the dropout key of step s is fold_in(rng, s)


# ---------------------------------------------------------------------------------------------
# The steps. Their per-device parts see one device's rows of the batch and the whole parameters;
# everything they return is combined over the devices with collectives (`parallel.per_device`).


def state_specs(state, mesh):
    """How a TrainState lies on `mesh`: parameters and optimizer state by the FSDP rule
    (`parallel.fsdp_specs`), the step and RNG key replicated."""
    return TrainState(
        step=P(),
        params=parallel.fsdp_specs(state.params, mesh),
        opt_state=parallel.fsdp_specs(state.opt_state, mesh),
        rng=P(),
    )


def context_order(model):
    """How a sequence is split over "context" for `model`: "zigzag" when it trains under a
    causal mask (it declares `causal_mask_in_training`), which balances the ring's work over the
    devices; else "contiguous"."""
    declared = "causal_mask_in_training" in getattr(model, "config_fields", ())
    return "zigzag" if declared and model.config.causal_mask_in_training else "contiguous"


def context_model(model, mesh):
    """`model` as the steps run it on `mesh`: with context parallelism (a "context" axis of size
    > 1) its self-attention runs as a ring over that axis, on each device's shard of the
    sequences, in `context_order(model)`; else `model` itself. The parameters are the same."""
    if mesh is None or parallel.context_size(mesh) == 1:
        return model
    config = getattr(model, "config", None)
    if not hasattr(config, "context_axis"):
        raise ValueError(
            f"{type(model).__name__} has no context parallelism (its config has no "
            "context_axis); the Transformer models have it."
        )
    config = dataclasses.replace(
        config, context_axis=parallel.CONTEXT, context_order=context_order(model)
    )
    return model.clone(config=config)


def make_train_step(model, task, optimizer, *, label_smoothing, mesh, mode="shard_map"):
    """(state, batch) -> (new state, {metric: (sum, count)} over the global batch).

    The gradient is computed per device; the optimizer update runs on whole arrays, so under
    FSDP each device updates its shards and the gradient norm that clipping needs is global.
    Under context parallelism the batch must come through `parallel.global_batch` in
    `context_order(model)`.
    """
    model = context_model(model, mesh)
    axes = parallel.sum_axes(mode)

    def gradient_share(params, batch, step_and_rng):
        step, rng = step_and_rng
        # Each device draws different dropout masks, and every step different ones again.
        rng = jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(axes))
        weights = task.weights(batch)
        # Dividing by the global weight makes the sum of per-device gradients the gradient of
        # the mean loss over the global batch, whatever the share of padding on each device.
        global_weight = lax.psum(jnp.sum(weights), axes)

        def loss_fn(params):
            logits = model.apply(
                {"params": params}, *task.model_inputs(batch), train=True, rngs={"dropout": rng}
            )
            loss, _ = tasks.loss_sum(logits, batch["targets"], weights, label_smoothing)
            return loss / jnp.maximum(global_weight, 1.0), logits

        grads, logits = jax.grad(loss_fn, has_aux=True)(params)
        metrics = lax.psum(tasks.metric_sums(logits, batch["targets"], weights), axes)
        return grads, metrics

    per_device_gradients = parallel.per_device(gradient_share, mesh, mode, gradients=True)

    def train_step(state, batch):
        grads, metrics = per_device_gradients(state.params, batch, (state.step, state.rng))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return parallel.constrain(new_state, state_specs(new_state, mesh), mesh, mode), metrics

    return train_step


def make_eval_step(model, task, *, mesh, mode="shard_map"):
    """(params, batch) -> {metric: (sum, count)} over the global batch."""
    model = context_model(model, mesh)
    axes = parallel.sum_axes(mode)

    def metrics(params, batch, _):
        logits = model.apply({"params": params}, *task.model_inputs(batch), train=False)
        return lax.psum(tasks.metric_sums(logits, batch["targets"], task.weights(batch)), axes)

    per_device_metrics = parallel.per_device(metrics, mesh, mode)
    return lambda params, batch: per_device_metrics(params, batch, ())


# ---------------------------------------------------------------------------------------------
# Building blocks of the loop.


def build_model(model_config):
    from transformer.modules.models import build_model as build  # the model zoo is imported on use

    return build(model_config)


def make_dataset(data_config, split, *, global_batch_size, seed, num_epochs, data_dir):
    """This host's grain dataset of `split`: batches of `global_batch_size / process_count` rows.

    num_epochs None repeats forever (training); 1 reads the split once, its last batch filled
    with padding rows that carry no weight (evaluation).
    """
    from transformer.data import make_dataset as make

    return make(
        data_config,
        split,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_epochs=num_epochs,
        data_dir=data_dir or None,
    )


def make_iterator(data_config, split, **kwargs):
    """A checkpointable iterator over `make_dataset(data_config, split, **kwargs)`."""
    return iter(make_dataset(data_config, split, **kwargs))


def training_data(config):
    """The training iterator: `config.data`, or the mixture `config.train_mixture` of variants of
    it in equal shares (each batch comes from one member)."""
    kwargs = dict(
        global_batch_size=config.global_batch_size,
        seed=config.seed,
        num_epochs=None,
        data_dir=config.data_dir,
    )
    if not config.train_mixture:
        return make_iterator(config.data, "train", **kwargs)
    members = {
        name: make_dataset(with_overrides(config.data, overrides), "train", **kwargs)
        for name, overrides in config.train_mixture.items()
    }
    return iter(grain.IterDataset.mix(members))


def with_data_fields(config):
    """`config.model` plus what the data decides, where the experiment left it out:
    vocab_size, num_classes (classifiers) and max_len (the longer of input and target length).

    Also checks that the data set's task is `config.task`.
    """
    from transformer.data import data_info

    info = data_info(config.data)
    if info.task != config.task:
        raise ValueError(
            f"config.task={config.task!r} but data set {config.data.name!r} is a "
            f"{info.task!r} data set; set config.task={info.task!r}."
        )
    model_config = config.model.copy_and_resolve_references()
    # A decoder's positions run over the targets, which may be longer than the inputs.
    max_len = max(info.max_length, info.max_target_length or 0)
    derived = {"vocab_size": info.vocab_size, "max_len": max_len}
    if info.num_classes is not None:
        derived["num_classes"] = info.num_classes
    with model_config.unlocked():
        for field, value in derived.items():
            if field not in model_config:
                model_config[field] = value
    return model_config


def _peek(iterator):
    """The next batch, leaving the iterator where it was."""
    position = iterator.get_state()
    batch = next(iterator)
    iterator.set_state(position)
    return batch


def make_init(model, task, optimizer, mesh=None):
    """(seed, batch) -> a fresh TrainState, parameters shaped by the batch: NumPy on the host, or
    with a `mesh`, made on the mesh laid out by `state_specs` (each device makes only its shards,
    so no device ever holds the whole state)."""

    def init(rng, sample):
        init_rng, dropout_rng, train_rng = jax.random.split(rng, 3)
        params = model.init(
            {"params": init_rng, "dropout": dropout_rng}, *task.model_inputs(sample), train=False
        )["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=train_rng,
        )

    on_host = jax.jit(init)

    def run(seed, batch):
        args = (jax.random.PRNGKey(seed), jax.tree.map(lambda x: np.asarray(x[:1]), batch))
        if mesh is None:
            return jax.device_get(on_host(*args))
        specs = state_specs(jax.eval_shape(init, *args), mesh)
        return jax.jit(init, out_shardings=parallel.shardings(specs, mesh))(*args)

    return run


class Programs(NamedTuple):
    """What a config compiles to; shared by runs that differ only in seed or data."""

    init: Callable
    train_step: Callable
    eval_step: Callable


@functools.lru_cache(maxsize=8)
def _programs(model, task, optimizer_fields, num_train_steps, label_smoothing, mode, mesh):
    optimizer = make_optimizer(ml_collections.ConfigDict(dict(optimizer_fields)), num_train_steps)
    train_step = parallel.distribute(
        make_train_step(
            model, task, optimizer, label_smoothing=label_smoothing, mesh=mesh, mode=mode
        ),
        mode,
        mesh,
        donate_state=True,
    )
    eval_step = parallel.distribute(make_eval_step(model, task, mesh=mesh, mode=mode), mode, mesh)
    init = make_init(model, task, optimizer, mesh if mode == "shard_map" else None)
    return Programs(init, train_step, eval_step)


def programs(config, model, task, mesh):
    """The jitted init, train and eval steps for `config`'s `model`, built once per setup: a
    sweep over seeds compiles them once (models and tasks are frozen dataclasses, hashed by
    value)."""
    # Only the cosine schedule depends on the run's length; the others compile once for all.
    schedule_steps = config.num_train_steps if config.optimizer.schedule == "cosine" else 0
    return _programs(
        model,
        task,
        tuple(sorted(config.optimizer.items())),
        schedule_steps,
        config.label_smoothing,
        config.parallel,
        mesh,
    )


def evaluate(eval_step, params, iterator, num_batches, mesh, mode, order="contiguous"):
    """Means of the metrics over `num_batches` batches (the whole split when 0); `order` is the
    model's `context_order`."""
    sums = None
    for index, batch in enumerate(iterator):
        if num_batches and index >= num_batches:
            break
        batch = parallel.global_batch(batch, mesh, mode, order)
        metrics = eval_step(params, batch)
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        # Wait for each step: eval steps do not depend on each other, so without this several
        # are in flight at once, and XLA's CPU collectives deadlock (then abort) when the threads
        # of one step's all-reduce wait for partners queued behind another step's.
        jax.block_until_ready(sums)
    if sums is None:
        raise ValueError("the evaluation data set yielded no batch.")
    return tasks.finalize(parallel.fetch(sums))


def eval_sets(config):
    """{split name in metrics: data config} from `config.eval_data` (or the "validation" split)."""
    if not config.eval_data:
        return {"eval": (config.data, config.eval_split)}
    sets = {}
    for name, overrides in config.eval_data.items():
        sets[f"eval_{name}"] = (with_overrides(config.data, overrides), config.eval_split)
    return sets


class _StopRequest:
    """Turns SIGTERM (a preemption, `scancel`, `kill`) into "save and stop at the next step"."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            del frame
            logging.warning("signal %d: saving a checkpoint and stopping.", signum)
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler, training just runs.
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self):
        """True on every host when any host was asked to stop (a collective when multi-host)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


class _Progress:
    """A tqdm bar on an interactive terminal; absl log lines otherwise."""

    def __init__(self, start, total):
        self.bar = None
        if jax.process_index() == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.start_time = time.time()
        self.start = start
        self.total = total

    def update(self, step, metrics):
        tokens_per_s = metrics["tokens_per_second"]
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            return
        elapsed = time.time() - self.start_time
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        logging.info(
            "step %d/%d  loss %.4f  accuracy %.4f  %.0f tokens/s  ETA %.0fs",
            step,
            self.total,
            metrics["loss"],
            metrics["accuracy"],
            tokens_per_s,
            eta,
        )

    def close(self):
        if self.bar is not None:
            self.bar.close()


def check_workdir(workdir):
    """A ValueError unless `workdir` is a directory this process can write, or can be made one."""
    if not workdir:
        raise ValueError("the workdir is empty; give a directory (it is created if missing).")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"the workdir {workdir} is a file; give a directory.")
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"the workdir {workdir} cannot be written: {existing} is not a writable directory."
        )


class Setup(NamedTuple):
    """What a config resolves to before anything is written: the task, the model, the task's
    evaluators."""

    task: tasks.Task
    model: Any
    evaluators: list


def prepare(config, workdir=None):
    """Checks `config` whole and builds what it names, writing nothing (`workdir` is where the
    run and its evaluators will write; None checks no workdir).

    Every mistake a config can hold is found here, as a ValueError naming the field, the value
    and what is allowed: unknown or invalid fields, a pattern or model option the model refuses,
    a data set that is missing, evaluator settings, a batch that does not divide over the
    devices, a `best_metric` the run would not produce, and a workdir whose checkpoints belong
    to another config.
    """
    if workdir is not None:
        check_workdir(workdir)
    config_schema.validate(config)
    if workdir is not None:
        check_resumable(config, workdir)
    task = tasks.get_task(config.task)
    task_fields = {field for other in tasks.TASKS.values() for field in other.config_fields}
    for field in sorted(task_fields):
        if config[field] and field not in task.config_fields:
            owners = [t.name for t in tasks.TASKS.values() if field in t.config_fields]
            raise ValueError(
                f"config.{field} is read only by task(s) {owners}; config.task={config.task!r}. "
                f"Leave config.{field} empty or set config.task to one of {owners}."
            )
    shape = parallel.mesh_shape(config.mesh.to_dict(), mode=config.parallel)
    parallel.local_batch_size(config.global_batch_size, shape)
    try:
        model_config = with_data_fields(config)
    except ValueError as error:
        raise ValueError(f"config.data: {error}") from error
    try:
        model = build_model(model_config)
    except (ValueError, TypeError) as error:
        raise ValueError(f"config.model: {error}") from error
    if shape[parallel.CONTEXT] > 1:
        check_context_parallelism(config, task, model)
    evaluators = task.make_evaluators(config, model, workdir)
    if config.best_metric:
        names = tasks.EVAL_METRICS + tuple(n for e in evaluators for n in e.metric_names)
        allowed = [f"{split}/{name}" for split in eval_sets(config) for name in names]
        if config.best_metric not in allowed:
            raise ValueError(
                f"config.best_metric={config.best_metric!r} is not a result this run produces; "
                f"allowed: {', '.join(allowed)}."
            )
    return Setup(task, model, evaluators)


def _first_batches(config):
    """{name: the first batch} of the training data and of each evaluation set."""
    batches = {"train": next(training_data(config))}
    for split, (data_config, data_split) in eval_sets(config).items():
        iterator = make_iterator(
            data_config,
            data_split,
            global_batch_size=config.global_batch_size,
            seed=config.seed,
            num_epochs=1,
            data_dir=config.data_dir,
        )
        batches[split] = next(iter(iterator))
    return batches


def check_context_parallelism(config, task, model):
    """Start-up errors for config.mesh.context > 1: every batch's lengths split into the
    shards (two zig-zag chunks each for a causal model), and the model runs on shards (traced
    abstractly on the mesh: nothing is computed)."""
    mesh = parallel.make_mesh(config.mesh.to_dict())
    shards, order = parallel.context_size(mesh), context_order(model)
    local = jax.local_device_count()
    if local % shards:
        # Each host reads whole sequences: their shards must lie on its own devices.
        raise ValueError(
            f"config.mesh.context={shards} does not divide the {local} devices of each host; "
            f"each host reads whole sequences, whose shards must lie on its devices; allowed: "
            f"a divisor of {local}."
        )
    batches = _first_batches(config)
    for name, batch in batches.items():
        try:
            jax.tree.map(lambda x: parallel.check_context_length(x, shards, order), batch)
        except ValueError as error:
            raise ValueError(f"config.data ({name} batches): {error}") from None
    # One row of the training batch, as shapes laid out on the mesh.
    specs = jax.tree.map(
        lambda x: P(None, parallel.CONTEXT) if np.ndim(x) >= 2 else P(), batches["train"]
    )
    sample = jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(
            (1, *np.shape(x)[1:]), np.asarray(x).dtype, sharding=NamedSharding(mesh, spec)
        ),
        batches["train"],
        specs,
    )

    def init(sample):
        rng = jax.random.PRNGKey(0)
        return context_model(model, mesh).init(
            {"params": rng, "dropout": rng}, *task.model_inputs(sample), train=True
        )

    traced = jax.shard_map(init, mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False)
    try:
        jax.eval_shape(traced, sample)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise ValueError(
            f"config.mesh.context={shards} splits each sequence over {shards} devices, which "
            f"config.model (name {config.model.name!r}) cannot run: {error} Allowed: "
            "config.mesh.context=1, or a model whose attention is all self-attention over the "
            "split sequence (decoder_lm; not encoder-decoder cross-attention, pooling "
            "classifiers or recurrent models)."
        ) from None


# ---------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config, workdir, setup=None):
    """Trains `config`'s model on its task, evaluating and checkpointing into `workdir`.

    Resumes from the newest checkpoint in `workdir` if there is one. Returns a TrainResult: the
    summary (also written to `workdir/summary.json` when training completes) and the final
    state. Raises NonFiniteLossError when the loss becomes NaN or inf, keeping the checkpoints
    saved before. After a SIGTERM it saves a checkpoint and returns early, status "stopped".

    The run holds `workdir`'s lock throughout: a second process on the same workdir gets a
    WorkdirBusyError naming this one. A workdir whose run completed is left as it is, and its
    summary returned. `setup` is what `prepare(config, workdir)` returned, for a caller that
    checked the config already; None prepares it here.
    """
    setup = setup or prepare(config, workdir)
    with workdir_lock.held(workdir, enabled=jax.process_index() == 0):
        return _train_and_evaluate(config, workdir, setup)


def _train_and_evaluate(config, workdir, setup):
    task, model, evaluators = setup.task, setup.model, setup.evaluators
    mesh = parallel.make_mesh(config.mesh.to_dict())
    mode = config.parallel
    order = context_order(model)  # of the sequences over "context", when split
    check_compatible_config(config, workdir)  # the first write into the workdir

    compiled = programs(config, model, task, mesh)
    schedule = learning_rate_schedule(config.optimizer, config.num_train_steps)
    train_iter = training_data(config)
    state = compiled.init(config.seed, _peek(train_iter))
    num_params = sum(int(np.size(p)) for p in jax.tree.leaves(state.params))
    logging.info(
        "model %s: %s parameters; %d devices on %d hosts, mesh %s, %s",
        config.model.name,
        f"{num_params:,}",
        jax.device_count(),
        jax.process_count(),
        dict(mesh.shape),
        mode,
    )

    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.keep_checkpoints,
        best_metric=config.best_metric,
        best_mode=config.best_mode,
    )
    # Restored onto this run's layout, whatever mesh the checkpoint was written from.
    restored = checkpointer.restore_latest(state, train_iter)
    state = state if restored is None else restored
    resumed_at = None if restored is None else int(parallel.fetch(state.step))
    finished = _completed_summary(workdir, resumed_at, config.num_train_steps)
    if finished is not None:
        checkpointer.close()
        logging.info("%s holds a completed run; its summary.json is kept as it is.", workdir)
        return TrainResult(finished, parallel.fetch(state))

    train_step, eval_step = compiled.train_step, compiled.eval_step
    # The log keeps no rows past the restored step: the steps after it are trained again.
    writer = MetricsWriter(workdir, resume_step=resumed_at or 0)

    def run_evals(step):
        results = {}
        for split, (data_config, data_split) in eval_sets(config).items():
            iterator = make_iterator(
                data_config,
                data_split,
                global_batch_size=config.global_batch_size,
                seed=config.seed,
                num_epochs=1,
                data_dir=config.data_dir,
            )
            metrics = evaluate(
                eval_step, state.params, iterator, config.eval_steps, mesh, mode, order
            )
            for evaluator in evaluators:
                metrics.update(
                    evaluator.evaluate(state.params, split, data_config, data_split, step)
                )
            writer.write(step, split, metrics)
            results.update({f"{split}/{name}": value for name, value in metrics.items()})
        logging.info("eval at step %d: %s", step, _format(results))
        return results

    step = start_step = resumed_at or 0
    peak_memory_gb = None  # of the compiled train step; None until a step has run
    best = _best_from_log(workdir, config)
    last_eval, last_train = {}, {}
    speed = _Speed(start_step)
    status = "completed"
    progress = _Progress(start_step, config.num_train_steps)
    try:
        with _StopRequest() as stop:
            while step < config.num_train_steps:
                batch = next(train_iter)
                device_batch = parallel.global_batch(batch, mesh, mode, order)
                state, metrics = train_step(state, device_batch)
                step += 1
                # Hosts read equal shares, so this host's tokens times the host count.
                speed.add(metrics, tasks.num_tokens(task, batch) * jax.process_count())
                if step == start_step + 1:
                    # The first step includes compilation: keep it out of the speed measurement.
                    _check_finite(parallel.fetch(metrics), step, start_step, resumed_at)
                    peak_memory_gb = train_step_memory_gb(train_step, state, device_batch)
                    speed.reset()

                is_last = step == config.num_train_steps
                do_eval = is_last or step % config.eval_every_steps == 0
                do_save = do_eval or step % config.checkpoint_every_steps == 0
                do_log = do_save or step % config.log_every_steps == 0
                # Asking every host is a collective; do it only at logging steps when multi-host.
                stopping = stop.agreed() if (do_log or jax.process_count() == 1) else False
                if not (do_log or stopping):
                    continue
                if speed.steps:
                    sums, seconds, steps, tokens = speed.take()
                    _check_finite(sums, step, speed.last_good_step, resumed_at)
                    last_train = tasks.finalize(sums)
                    last_train["learning_rate"] = float(schedule(step))
                    last_train["steps_per_second"] = steps / seconds
                    last_train["tokens_per_second"] = tokens / seconds
                    writer.write(step, "train", last_train)
                    progress.update(step, last_train)
                speed.last_good_step = step
                if do_eval:
                    last_eval = run_evals(step)
                    best = _update_best(best, last_eval, step, config)
                if do_save or stopping:
                    checkpointer.save(
                        step,
                        state,
                        train_iter,
                        metrics=last_eval if do_eval else None,
                    )
                speed.reset()  # evaluation and saving are not training time
                if stopping:
                    status = "stopped"
                    break
            if status == "completed" and not last_eval:  # resumed from the final checkpoint
                last_eval = run_evals(step)
    finally:
        progress.close()
        checkpointer.wait()  # a pending save of a good state completes even when we raise
        checkpointer.close()
        writer.close()
    summary = {
        "status": status,
        "step": step,
        "final": {
            **{f"train/{k}": v for k, v in last_train.items()},
            **last_eval,
            **({} if peak_memory_gb is None else {"train/peak_memory_gb": peak_memory_gb}),
        },
        "best": best,
        # None, not 0, when this process timed no step (it resumed from the final checkpoint).
        "steps_per_second": speed.total_steps / speed.total_seconds if speed.total_steps else None,
        "tokens_per_second": speed.total_tokens / speed.total_seconds
        if speed.total_steps
        else None,
        "num_params": num_params,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "parallel": mode,
        "mesh": dict(mesh.shape),
        "config": json.loads(config.to_json_best_effort()),
        # What the numbers came from: CPU model, cores, devices and library versions.
        "machine": provenance.machine(),
    }
    if jax.process_index() == 0 and status == "completed":
        write_json_atomically(os.path.join(workdir, "summary.json"), summary)
    return TrainResult(summary, parallel.fetch(state))


def _completed_summary(workdir, resumed_at, num_train_steps):
    """The summary of a run that completed in `workdir` at `num_train_steps`, or None."""
    path = os.path.join(workdir, "summary.json")
    if resumed_at != num_train_steps or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None  # damaged: evaluate again and write a new one
    if summary.get("status") == "completed" and summary.get("step") == num_train_steps:
        return summary
    return None


def train_step_memory_gb(train_step, state, batch):
    """Peak memory of the compiled train step, GB (1e9 bytes), by XLA's buffer assignment:
    arguments + outputs - donated + temporaries, per device. None under pmap (no `lower`).

    Call it after the first step: `lower(...).compile()` then finds that step's executable in
    JAX's cache and compiles nothing.
    """
    if not hasattr(train_step, "lower"):
        return None
    m = train_step.lower(state, batch).compile().memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    ) / 1e9


class _Speed:
    """Sums train metrics on the devices between log steps, and times the training steps."""

    def __init__(self, start_step):
        self.total_seconds = self.total_steps = self.total_tokens = 0
        self.last_good_step = start_step  # the loss was finite up to here
        self.reset()

    def reset(self):
        self.sums, self.steps, self.tokens, self.start = None, 0, 0, time.time()

    def add(self, metrics, tokens):
        self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
        self.steps += 1
        self.tokens += tokens

    def take(self):
        """(metric sums on the host, seconds, steps, tokens) since the last reset; syncs."""
        sums = parallel.fetch(self.sums)  # waits for the steps to finish
        seconds = max(time.time() - self.start, 1e-9)
        self.total_seconds += seconds
        self.total_steps += self.steps
        self.total_tokens += self.tokens
        return sums, seconds, self.steps, self.tokens


def _check_finite(sums, step, last_good_step, resumed_at=None):
    """Raises NonFiniteLossError when the summed loss is NaN or inf, with advice for the case:
    right after a restore, the restored checkpoint is the first suspect."""
    loss = sums["loss"][0]
    if np.isfinite(loss):
        return
    if resumed_at is not None and last_good_step == resumed_at:
        raise NonFiniteLossError(
            f"the training loss became {loss} between steps {resumed_at} and {step}, the first "
            f"steps after resuming from the checkpoint at step {resumed_at}: that checkpoint is "
            "the first suspect. A checkpoint is restored only when its arrays match the "
            "digests saved with it, so it holds what training had reached: the run may have "
            "been diverging before it was saved. To go "
            f"back further, move checkpoints/{resumed_at} into checkpoints_unreadable/ and run "
            "the same command again; it resumes from the checkpoint before it. Then try a lower "
            "learning rate, more warmup, gradient clipping or float32 compute."
        )
    raise NonFiniteLossError(
        f"the training loss became {loss} between steps {last_good_step} and {step}. "
        f"Training stopped; the checkpoints up to step {last_good_step} are kept. Try a "
        "lower learning rate, more warmup, gradient clipping or float32 compute."
    )


def _update_best(best, results, step, config):
    if not config.best_metric:
        return best
    if config.best_metric not in results:
        raise ValueError(
            f"best_metric={config.best_metric!r} is not an evaluation result; "
            f"allowed: {', '.join(sorted(results))}."
        )
    value = results[config.best_metric]
    # On a tie the later step wins, as in the checkpoint manager's choice of what to keep.
    if best["value"] is None or (
        value >= best["value"] if config.best_mode == "max" else value <= best["value"]
    ):
        return {"metric": config.best_metric, "value": value, "step": step}
    return best


def _best_from_log(workdir, config):
    """The best evaluation so far, read back from metrics.jsonl when resuming."""
    best = {"metric": config.best_metric, "value": None, "step": None}
    for record in read_metrics(workdir):
        split, step = record.pop("split"), record.pop("step")
        results = {f"{split}/{name}": value for name, value in record.items()}
        if config.best_metric in results:
            best = _update_best(best, results, step, config)
    return best


def _format(results):
    return ", ".join(
        f"{k} {v:.4g}" for k, v in results.items() if k.endswith(("/accuracy", "/loss", "/bleu"))
    )
