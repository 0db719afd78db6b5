"""The training config: its fields, their defaults, and the checks run at start-up.

Every experiment starts from `base_config()` and changes what it needs. `validate` fails on the
first wrong field with a message naming it and what is allowed, before any data is read or any
array is built: a typo in a long TPU job should cost seconds, not hours.
"""

import ml_collections

from transformer.training.optimizer import SCHEDULES
from transformer.training.parallel import MODES
from transformer.training.tasks import TASKS


def base_config():
    """Defaults of every field the training loop reads; `model` and `data` are per experiment."""
    config = ml_collections.ConfigDict()
    config.task = "classification"  # a name in transformer.training.tasks.TASKS
    config.model = ml_collections.ConfigDict({"name": "encoder_classifier"})  # build_model's
    config.data = ml_collections.ConfigDict({"name": ""})  # transformer.data.make_iterator's
    # Extra evaluation sets: {name: fields replacing those of `data`}; each is logged as
    # "eval_<name>". Empty: evaluate `data` on `eval_split`, logged as "eval".
    config.eval_data = ml_collections.ConfigDict()
    config.eval_split = "validation"
    # Training on a mixture: {name: fields replacing those of `data`}, in equal shares (every
    # batch from one member). Empty: train on `data`.
    config.train_mixture = ml_collections.ConfigDict()
    config.data_dir = ""  # where TFDS data is prepared; "" = TFDS's default
    config.seed = 0
    config.global_batch_size = 32  # over all devices of all hosts
    config.num_train_steps = 1000
    config.eval_every_steps = 500
    config.eval_steps = 10  # batches per evaluation; 0 = the whole split
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2  # the latest ones; the best is kept besides
    config.best_metric = ""  # e.g. "eval/accuracy"; "" keeps no best checkpoint
    config.best_mode = "max"
    config.label_smoothing = 0.0
    # Decode the evaluation sets and score BLEU (seq2seq): transformer/evaluation/translation.py's
    # fields. Empty: no decoding.
    config.translation_eval = ml_collections.ConfigDict()
    # Decode the evaluation sets and score exact match and token accuracy by source length
    # (seq2seq): transformer/evaluation/exact_match.py's fields. Empty: no decoding.
    config.exact_match_eval = ml_collections.ConfigDict()
    config.parallel = "shard_map"  # or "pmap" (data parallelism only)
    # Sizes of the device mesh's axes (transformer/training/parallel.py); -1 = the rest of the
    # devices. `data` and `fsdp` split the batch; `fsdp` also shards parameters and optimizer
    # state; `context` splits each sequence (ring attention; shard_map, Transformer models
    # without cross-attention). `tensor` is kept for later and takes 1.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            warmup_steps=100,
            schedule="cosine",
            weight_decay=0.01,
            b1=0.9,
            b2=0.98,
            eps=1e-9,
            grad_clip_norm=1.0,
        )
    )
    # What `--sweep` runs: every variant of the experiment with every seed.
    config.sweep = ml_collections.ConfigDict(dict(variants=(), seeds=(0, 1, 2)))
    return config


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# field -> (check, what is allowed)
CHECKS = {
    "task": (lambda v: v in TASKS, f"one of {sorted(TASKS)}"),
    "parallel": (lambda v: v in MODES, f"one of {list(MODES)}"),
    "best_mode": (lambda v: v in ("max", "min"), "'max' or 'min'"),
    "seed": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "global_batch_size": (_positive_int, "a positive integer"),
    "num_train_steps": (_positive_int, "a positive integer"),
    "eval_every_steps": (_positive_int, "a positive integer"),
    "eval_steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = all)"),
    "log_every_steps": (_positive_int, "a positive integer"),
    "checkpoint_every_steps": (_positive_int, "a positive integer"),
    "keep_checkpoints": (_positive_int, "a positive integer"),
    "label_smoothing": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "optimizer.schedule": (lambda v: v in SCHEDULES, f"one of {sorted(SCHEDULES)}"),
    "optimizer.learning_rate": (lambda v: v > 0, "a number > 0"),
    "optimizer.warmup_steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "optimizer.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "optimizer.grad_clip_norm": (lambda v: v >= 0, "a number >= 0 (0 = no clipping)"),
}


def validate(config):
    """Raises ValueError naming the first unknown or invalid field and what is allowed."""
    _check_known_fields(config, base_config(), "")
    for field, (check, allowed) in CHECKS.items():
        value = config
        for part in field.split("."):
            value = value[part]
        try:
            ok = check(value)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"config.{field}={value!r} is invalid; allowed: {allowed}.")
    if not config.data.get("name"):
        raise ValueError("config.data.name is empty; set it to a data set name.")
    if config.best_metric and "/" not in config.best_metric:
        raise ValueError(
            f"config.best_metric={config.best_metric!r} must name an evaluation "
            "result as '<split>/<metric>', e.g. 'eval/accuracy', or be ''."
        )


# Top-level fields whose own fields are checked by what reads them, not against base_config().
FREE_FORM_FIELDS = (
    "model",
    "data",
    "eval_data",
    "train_mixture",
    "sweep",
    "translation_eval",
    "exact_match_eval",
)


def _check_known_fields(config, defaults, prefix):
    """Every field of `config` must exist in `defaults`; `model`, `data`, `eval_data`,
    `translation_eval` and `exact_match_eval` are free-form here (build_model, make_iterator and
    the evaluators check their own fields)."""
    for key in config.keys():
        if key not in defaults:
            raise ValueError(
                f"unknown config field '{prefix}{key}'; allowed: {sorted(defaults.keys())}."
            )
        if key in FREE_FORM_FIELDS and not prefix:
            continue
        if isinstance(defaults[key], ml_collections.ConfigDict):
            _check_known_fields(config[key], defaults[key], f"{prefix}{key}.")


def differences(old, new, prefix=""):
    """[(dotted field, old value, new value)] where two nested dicts (e.g. configs as JSON)
    differ."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [(prefix.rstrip("."), old, new)]
    return [
        difference
        for key in sorted(set(old) | set(new))
        for difference in differences(old.get(key), new.get(key), f"{prefix}{key}.")
    ]
