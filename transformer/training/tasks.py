"""What differs between tasks: how a model is called on a batch, the loss, metrics, evaluators.

A task sees one device's share of a batch. Its loss and metrics are returned as *sums* with their
counts, so that the training loop can add them up across devices and batches before dividing:
the mean over the global batch is then exactly the mean one device would compute.

Batches (NumPy or jax arrays; id 0 is padding), as the data sets of each task make them:
  classification  {"inputs": [batch, length], "targets": [batch]}; target -1 marks padding rows
  language_modelling {"inputs": [batch, length], "targets": [batch, length]}, and when packed
                  (data.pack_documents) "segment_ids" and "positions" [batch, length] too
  seq2seq         {"inputs": [batch, src_length], "targets": [batch, tgt_length]}
Any batch may carry "weights", `[batch]` or shaped like "targets", to leave rows or positions
out, e.g. the padding rows of a last evaluation batch.

A task may also bring evaluators: metrics beyond loss and accuracy that need more than one
forward pass, such as BLEU of translations decoded token by token. The training loop runs them
after each evaluation and knows nothing of what they compute; this is where a new metric plugs
in.
"""

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from transformer.data import data_info, spec, with_overrides
from transformer.evaluation import exact_match, translation
from transformer.training.optimizer import smooth_labels

# What `finalize` reports for every evaluation set, before any evaluator's metrics.
EVAL_METRICS = ("loss", "accuracy", "perplexity", "bits_per_target")


class Evaluator:
    """A metric computed after each evaluation of a data set.

    metric_names: the names `evaluate` returns (logged as "<eval set>/<name>"), known before
      training so that `config.best_metric` can be checked at start-up.
    evaluate(params, eval_set, data_config, split, step) -> {name: value}: params are the
      replicated parameters; eval_set the name of the set in the logs ("eval", "eval_d8").
    """

    def __init__(self, metric_names, evaluate):
        self.metric_names = tuple(metric_names)
        self.evaluate = evaluate


def no_evaluators(config, model, workdir):
    del config, model, workdir
    return []


@dataclasses.dataclass(frozen=True)
class Task:
    """How to call a model on a batch, which targets count, and what else to evaluate.

    model_inputs(batch) -> the positional arguments of `model.apply` / `model.init` after the
      variables; the model returns logits `[..., classes]` matching "targets".
    weights(batch) -> float weights shaped like "targets".
    targets_are_tokens: targets are tokens the model reads too (seq2seq), so tokens/s counts them.
    make_evaluators(config, model, workdir) -> [Evaluator]: called once at start-up, before
      anything is written, so it checks its config fields there.
    config_fields: top-level config fields that only this task reads (its evaluators'); setting
      one for another task is an error, not silently ignored.
    """

    name: str
    model_inputs: Callable
    weights: Callable
    targets_are_tokens: bool = False
    make_evaluators: Callable = no_evaluators
    config_fields: tuple = ()


def _inputs(batch):
    return (batch["inputs"],)


def _language_model_inputs(batch):
    """The inputs, and for rows packed with several documents (data.pack_documents) their
    segment ids and per-document positions, which `DecoderLM` takes after the inputs."""
    if "segment_ids" in batch:
        return (batch["inputs"], batch["segment_ids"], batch["positions"])
    return (batch["inputs"],)


def _inputs_and_targets(batch):
    """The decoder reads the targets (shifted right inside the model: teacher forcing)."""
    return (batch["inputs"], batch["targets"])


def _example_weights(batch):
    """[batch]: 1 per example; 0 for padding rows (target -1) or where "weights" says so."""
    weights = (batch["targets"] >= 0).astype(jnp.float32)
    if "weights" in batch:
        weights = weights * batch["weights"].astype(jnp.float32)
    return weights


def _token_weights(batch):
    """[batch, length]: 1 at every target token that is not padding."""
    weights = (batch["targets"] != 0).astype(jnp.float32)
    if "weights" in batch:
        rows = batch["weights"].astype(jnp.float32)  # [batch] or [batch, length]
        weights = weights * rows.reshape(rows.shape + (1,) * (weights.ndim - rows.ndim))
    return weights


def translation_evaluators(config, model, workdir):
    """BLEU by source length (`transformer.evaluation.translation`) when config.translation_eval
    asks for it; alignment heatmaps go to workdir/alignments/<eval set>_step_<step>/."""
    if not config.translation_eval:
        return []
    settings = translation.check(config.translation_eval, config.data)

    def evaluate(params, eval_set, data_config, split, step):
        return translation.evaluate_translation(
            model,
            params,
            data_config,
            split,
            settings,
            batch_size=config.global_batch_size,
            data_dir=config.data_dir,
            plot_dir=os.path.join(workdir, "alignments", f"{eval_set}_step_{step}"),
        )

    return [Evaluator(translation.metric_names(settings), evaluate)]


def longest_training_source(config):
    """The longest source, in tokens without its closing EOS, that training can show the model:
    the training data's max_length (of every member of a mixture) less that EOS."""
    members = [with_overrides(config.data, m) for m in config.train_mixture.values()]
    return max(data_info(data).max_length for data in members or [config.data]) - 1


def exact_match_evaluators(config, model, workdir):
    """Exact match and token accuracy by source length (`transformer.evaluation.exact_match`)
    when config.exact_match_eval asks for it; alignment heatmaps go to
    workdir/alignments/<eval set>_step_<step>/."""
    if not config.exact_match_eval:
        return []
    settings = exact_match.resolve(config.exact_match_eval)
    longest_trained = longest_training_source(config)

    def evaluate(params, eval_set, data_config, split, step):
        return exact_match.evaluate_exact_match(
            model,
            params,
            data_config,
            split,
            settings,
            longest_trained=longest_trained,
            batch_size=config.global_batch_size,
            data_dir=config.data_dir,
            plot_dir=os.path.join(workdir, "alignments", f"{eval_set}_step_{step}"),
        )

    return [Evaluator(exact_match.metric_names(settings), evaluate)]


def seq2seq_evaluators(config, model, workdir):
    return translation_evaluators(config, model, workdir) + exact_match_evaluators(
        config, model, workdir
    )


# Keyed by the task names the data sets declare (`transformer.data.spec`).
TASKS = {
    spec.CLASSIFICATION: Task(spec.CLASSIFICATION, _inputs, _example_weights),
    spec.LANGUAGE_MODELLING: Task(spec.LANGUAGE_MODELLING, _language_model_inputs, _token_weights),
    spec.SEQ2SEQ: Task(
        spec.SEQ2SEQ,
        _inputs_and_targets,
        _token_weights,
        targets_are_tokens=True,
        make_evaluators=seq2seq_evaluators,
        config_fields=("translation_eval", "exact_match_eval"),
    ),
}


def get_task(name):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASKS)}.")
    return TASKS[name]


def loss_sum(logits, targets, weights, label_smoothing=0.0):
    """Sum over weighted targets of the (label-smoothed) cross-entropy, and the sum of weights.

    logits `[..., classes]`, targets and weights `[...]`. Computed in float32 whatever the logits.
    """
    logits = logits.astype(jnp.float32)
    targets = jnp.maximum(targets, 0)  # padding rows (-1) have weight 0 but need a valid index
    if label_smoothing > 0:
        soft = smooth_labels(targets, logits.shape[-1], label_smoothing)
        per_target = -jnp.sum(soft * jax.nn.log_softmax(logits), axis=-1)
    else:
        per_target = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[
            ..., 0
        ]
    return jnp.sum(per_target * weights), jnp.sum(weights)


def metric_sums(logits, targets, weights):
    """{"loss": (sum, count), "accuracy": (sum, count)}, the loss without label smoothing."""
    loss, count = loss_sum(logits, targets, weights)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
    return {"loss": (loss, count), "accuracy": (correct, count)}


def finalize(sums):
    """{"name": (sum, count)} summed over devices and batches -> {"name": mean}, plus derived.

    Adds perplexity and bits per target to every loss (bits per character for a character LM).
    """
    means = {name: float(s) / max(float(c), 1e-9) for name, (s, c) in sums.items()}
    if "loss" in means:
        means["perplexity"] = float(np.exp(min(means["loss"], 50.0)))
        means["bits_per_target"] = means["loss"] / np.log(2.0)
    return means


def num_tokens(task, batch):
    """Tokens a model reads in a batch, without padding: what tokens/s counts."""
    keys = ("inputs", "targets") if task.targets_are_tokens else ("inputs",)
    return int(sum(np.count_nonzero(np.asarray(batch[k])) for k in keys))
