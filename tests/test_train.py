"""The training loop: it learns, evaluates, writes its metrics and summary, and fails clearly.

The loop's mechanics are tested on a tiny Flax model and an in-memory grain data set defined
here (`use_toy_setup`), so that they do not depend on the model zoo or the TFDS builders; the
experiments' `smoke` variants run the real ones (tests/test_launch.py).
"""

import json
import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from transformer.training import config_schema, loop, optimizer, tasks
from transformer.training.metrics import read_metrics

LENGTH = 8
VOCAB = 16


class ToyModel(nn.Module):
    """Embeddings, dropout, one dense layer; per-position logits, or pooled for classification.

    inputs int `[batch, length]` -> `[batch, classes]` or `[batch, length, vocab]`.
    """

    per_position: bool = False
    num_classes: int = 2
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, inputs, *, train=False):
        x = nn.Embed(VOCAB, 16)(inputs)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.tanh(nn.Dense(16)(x))
        if self.per_position:
            return nn.Dense(VOCAB)(x)
        return nn.Dense(self.num_classes)(x.mean(axis=1))


def toy_examples(task, index):
    """Example `index` of a learnable toy task: deterministic, no global state."""
    rng = np.random.default_rng(index)
    inputs = rng.integers(1, VOCAB, size=LENGTH).astype(np.int32)
    if task == "classification":
        # Are most tokens large? Mean pooling can learn that.
        return {"inputs": inputs, "targets": np.int32(np.sum(inputs > VOCAB // 2) >= LENGTH // 2)}
    # Language modelling: the next token; the last position is padding (target 0).
    return {"inputs": inputs, "targets": np.append(inputs[1:], 0).astype(np.int32)}


def toy_iterator(
    data_config, split, *, global_batch_size, seed, process_index, process_count, **unused
):
    """The toy data set as the real pipeline yields it: this host's rows, checkpointable."""
    offset = {"train": 0, "validation": 1_000_000}[split]
    dataset = grain.MapDataset.range(offset, offset + data_config.size)
    if split == "train":
        dataset = dataset.shuffle(seed=seed).repeat()
    dataset = dataset[process_index::process_count]
    dataset = dataset.map(lambda i: toy_examples(data_config.task, int(i)))
    dataset = dataset.batch(global_batch_size // process_count, drop_remainder=split == "train")
    if split == "train":
        first = data_config.get("nan_from_batch") or np.inf
        dataset = dataset.map_with_index(lambda i, batch: _poison(batch, i >= first))
    # Read in the calling thread, as the real pipeline does by default (`read_threads` 0):
    # grain's default read-ahead (16 threads, 500 batches) would compute hundreds of batches no
    # step asks for, beside the training step.
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def _poison(batch, poisoned):
    """The batch with NaN weights when `poisoned`: a way to make the training loss NaN."""
    value = np.nan if poisoned else 1.0
    return {**batch, "weights": np.full(len(batch["targets"]), value, np.float32)}


def toy_model(model_config):
    return ToyModel(per_position=model_config.name == "toy_lm")


def use_toy_setup(monkeypatch):
    """Makes `train_and_evaluate` build the toy model and read the toy data."""
    monkeypatch.setattr(loop, "build_model", toy_model)
    monkeypatch.setattr(loop, "with_data_fields", lambda config: config.model)
    monkeypatch.setattr(
        loop,
        "make_iterator",
        lambda data_config, split, **kw: toy_iterator(
            data_config,
            split,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            **kw,
        ),
    )


def toy_config(task="classification", **overrides):
    config = config_schema.base_config()
    config.task = task
    config.model = ml_collections.ConfigDict(
        {"name": "toy_classifier" if task == "classification" else "toy_lm"}
    )
    config.data = ml_collections.ConfigDict({"name": "toy", "task": task, "size": 4096})
    config.global_batch_size = 16
    config.num_train_steps = 30
    config.eval_every_steps = 10
    config.eval_steps = 4
    config.log_every_steps = 10
    config.checkpoint_every_steps = 10
    config.optimizer.learning_rate = 3e-2
    config.optimizer.warmup_steps = 5
    config.optimizer.schedule = "constant"  # the same compiled step for any num_train_steps
    config.best_metric = "eval/accuracy"
    config.update_from_flattened_dict(overrides)
    return config


def test_classification_learns_and_writes_summary(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    summary = loop.train_and_evaluate(toy_config(), str(tmp_path)).summary
    assert summary["status"] == "completed" and summary["step"] == 30
    assert summary["final"]["eval/accuracy"] > 0.8  # the larger class is 55%
    written = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "config",
        "final",
        "best",
        "steps_per_second",
        "tokens_per_second",
        "num_params",
        "device_count",
    ):
        assert key in written
    assert written["device_count"] == jax.device_count() == 8
    assert written["best"]["metric"] == "eval/accuracy"
    assert written["best"]["value"] == max(r["accuracy"] for r in read_metrics(tmp_path, "eval"))
    assert written["num_params"] == VOCAB * 16 + 16 * 16 + 16 + 16 * 2 + 2
    train_records = read_metrics(tmp_path, "train")
    assert [r["step"] for r in train_records] == [10, 20, 30]
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert os.listdir(tmp_path / "tensorboard")  # event files
    # Kept: the last two checkpoints, and the best one by eval accuracy.
    best_step = written["best"]["step"]
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept[-2:] == [20, 30] and best_step in kept and len(kept) <= 3


def test_language_modelling_counts_only_real_tokens(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    summary = loop.train_and_evaluate(
        toy_config("language_modelling", num_train_steps=10), str(tmp_path)
    ).summary
    assert np.isfinite(summary["final"]["eval/loss"])
    assert summary["final"]["eval/bits_per_target"] == pytest.approx(
        summary["final"]["eval/loss"] / np.log(2)
    )


def test_loss_and_metric_sums_ignore_padding():
    logits = jnp.log(jnp.array([[[0.25, 0.5, 0.25], [0.1, 0.6, 0.3], [0.9, 0.05, 0.05]]]))
    targets = jnp.array([[1, 2, 0]])  # the last position is padding
    weights = tasks.TASKS["language_modelling"].weights({"targets": targets})
    loss, count = tasks.loss_sum(logits, targets, weights)
    assert count == 2 and loss == pytest.approx(-np.log(0.5) - np.log(0.3), rel=1e-6)
    sums = tasks.metric_sums(logits, targets, weights)
    assert tasks.finalize(jax.device_get(sums))["accuracy"] == pytest.approx(0.5)


def test_label_smoothing_matches_its_definition():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    smoothed, _ = tasks.loss_sum(logits, jnp.array([0]), jnp.ones(1), label_smoothing=0.3)
    log_p = jax.nn.log_softmax(logits[0])
    expected = -(0.8 * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2])
    assert smoothed == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("schedule", sorted(optimizer.SCHEDULES))
def test_schedules_warm_up_linearly_to_the_peak(schedule):
    opt = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=10, schedule=schedule))
    lr = optimizer.learning_rate_schedule(opt, total_steps=100)
    assert float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
    if schedule == "inverse_sqrt":
        assert float(lr(40)) == pytest.approx(0.5)
    if schedule == "cosine":
        assert float(lr(100)) == pytest.approx(0.0, abs=1e-6)


def test_nan_loss_stops_with_a_clear_message_and_keeps_good_checkpoints(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    # NaN weights in the 26th batch on poison the loss from step 26.
    config = toy_config(**{"data.nan_from_batch": 25})
    with pytest.raises(loop.NonFiniteLossError, match=r"became nan between steps 20 and 30"):
        loop.train_and_evaluate(config, str(tmp_path))
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept[-1] == 20
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("task", "regression", r"config.task='regression' is invalid; allowed: one of \["),
        (
            "parallel",
            "dp",
            r"config.parallel='dp' is invalid; allowed: one of \['shard_map', 'pmap'\]",
        ),
        ("optimizer.schedule", "linear", r"config.optimizer.schedule='linear' is invalid; allowed"),
        ("global_batch_size", 0, r"config.global_batch_size=0 is invalid; allowed: a positive"),
        ("label_smoothing", 1.5, r"config.label_smoothing=1.5 is invalid; allowed: a number in"),
        ("best_metric", "accuracy", r"config.best_metric='accuracy' must name an evaluation"),
    ],
)
def test_bad_config_values_are_named_with_what_is_allowed(field, value, message):
    config = toy_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=message):
        config_schema.validate(config)


def test_unknown_config_fields_are_named_with_what_is_allowed():
    config = toy_config()
    with config.unlocked():
        config.num_steps = 10
    with pytest.raises(
        ValueError,
        match=r"unknown config field 'num_steps'; allowed: \[.*"
        r"'num_train_steps'",
    ):
        config_schema.validate(config)
    config = toy_config()
    with config.optimizer.unlocked():
        config.optimizer.lr = 1.0
    with pytest.raises(ValueError, match=r"unknown config field 'optimizer.lr'"):
        config_schema.validate(config)


def test_batch_not_divisible_by_devices_is_a_clear_error(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    with pytest.raises(
        ValueError, match=r"global_batch_size=12 does not divide across 8 batch shards"
    ):
        loop.train_and_evaluate(toy_config(global_batch_size=12), str(tmp_path))


def test_a_task_brings_its_evaluators_and_the_loop_logs_them(monkeypatch, tmp_path):
    """The loop runs whatever evaluators the task makes, knowing nothing of them, and a metric
    they declare may be the best metric."""
    use_toy_setup(monkeypatch)
    calls = []

    def make_evaluators(config, model, workdir):
        def evaluate(params, eval_set, data_config, split, step):
            calls.append((eval_set, split, step, workdir))
            return {"parameter_count": float(sum(np.size(p) for p in jax.tree.leaves(params)))}

        return [tasks.Evaluator(["parameter_count"], evaluate)]

    task = tasks.TASKS["classification"]
    with_evaluator = tasks.Task(
        task.name, task.model_inputs, task.weights, make_evaluators=make_evaluators
    )
    monkeypatch.setitem(tasks.TASKS, "classification", with_evaluator)
    config = toy_config(num_train_steps=20, best_metric="eval/parameter_count")
    summary = loop.train_and_evaluate(config, str(tmp_path)).summary
    assert calls == [
        ("eval", "validation", 10, str(tmp_path)),
        ("eval", "validation", 20, str(tmp_path)),
    ]
    assert summary["final"]["eval/parameter_count"] > 0
    assert summary["best"]["metric"] == "eval/parameter_count"
    assert [r["parameter_count"] for r in read_metrics(tmp_path, "eval")] == [
        summary["final"]["eval/parameter_count"]
    ] * 2


def test_a_best_metric_nobody_produces_is_refused_before_training(monkeypatch, tmp_path):
    use_toy_setup(monkeypatch)
    with pytest.raises(
        ValueError, match=r"'eval/bleu' is not a result this run produces; allowed: eval/loss"
    ):
        loop.train_and_evaluate(toy_config(best_metric="eval/bleu"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_loop_imports_nothing_task_specific():
    """BLEU, decoding and data sets reach the loop only through a task."""
    source = open(loop.__file__, encoding="utf-8").read()
    imports = [
        line for line in source.splitlines() if line.lstrip().startswith(("import ", "from "))
    ]
    for name in ("evaluation", "translation", "decoding", "sacrebleu", "sentencepiece"):
        assert not any(name in line for line in imports), name
