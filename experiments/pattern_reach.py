r"""Pattern reach: can a model with this attention pattern recall a value stored this far away?

Associative recall (transformer/data/associative_recall.py): `k_1 v_1 ... k_n v_n q`, answer the
value stored with key q. Each data set puts the queried key at one `distance` from the query; a
model trains on the mixture of every even distance (each batch from one), so it must find the
key by content, and is evaluated at each distance on its own. A token can only use what its
pattern lets it see, layer by layer: with one sliding-window layer, nothing more than w
positions away; a second layer relays; anchors (global tokens) relay everything.

    python launch.py --config=experiments/pattern_reach.py:cpu --sweep --workdir=/tmp/reach
    python launch.py --config=experiments/pattern_reach.py:cpu,sliding_window-2layers \
        --workdir=/tmp/reach_one

Presets (PRESETS: config fields): "smoke" (tests), "cpu" (the README's run, on 2 cores: 9-token
sequences, 800 steps), "full" (GPU/TPU: 129-token sequences, 20,000 steps; windows and blocks 8
times longer). Variants: "<pattern>-<layers>layers", a pattern of PATTERNS in a model of that
many layers, e.g. "sliding_window-2layers"; the sweep runs the preset's depths for each pattern.

The classifier reads out with learned attention pooling over all positions (no [CLS]): the
answer can be formed at the query or at the value (when the value sees the query), so what is
measured is how far apart a query and its pair may be for the pattern to connect them.
"""

import ml_collections

from transformer.training import experiment
from transformer.training.config_schema import base_config

# name -> (pattern, pattern_options) for transformer.patterns.build, at the cpu preset's scale
# (9-token sequences); SCALE multiplies the lengths in them.
PATTERNS = {
    "full": ("full", {}),
    "causal": ("causal", {}),
    "sliding_window": ("sliding_window", {"left": 2}),
    "anchor": ("anchor", {"num_anchors": 1}),
    "random": ("random", {"num_blocks": 2, "block_size": 2}),
    "bigbird": (
        "bigbird",
        {"block_size": 2, "window_blocks": 3, "num_anchor_blocks": 1, "num_random_blocks": 1},
    ),
}
SCALED = ("left", "block_size", "num_anchors")  # the pattern_options that are lengths


def variant_name(pattern, layers):
    return f"{pattern}-{layers}layers"


def variants(patterns, depths):
    return tuple(variant_name(p, depth) for depth in depths for p in patterns)


def at_distances(*distances):
    """{"d<distance>": the data with the queried key at that distance} for each distance."""
    return {f"d{d}": {"builder_overrides": {"distance": d}} for d in distances}


# Sequences of 2 * num_pairs + 1 tokens; `train_mixture`: every even distance 2..2 * num_pairs
# except in the smoke preset; `model.num_layers`: the deepest variant's, for the default variant.
PRESETS = {
    "smoke": {
        "data.builder_overrides.num_pairs": 4,
        "data.builder_overrides.num_keys": 8,
        "data.builder_overrides.num_values": 4,
        "data.builder_overrides.num_train": 64,
        "train_mixture": at_distances(2, 8),
        "eval_data": at_distances(2, 8),
        "model.d_model": 16,
        "model.num_heads": 2,
        "model.num_layers": 2,
        "global_batch_size": 16,
        "num_train_steps": 10,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0,),
        "sweep.variants": variants(("full", "sliding_window"), depths=(2,)),
    },
    "cpu": {
        "data.builder_overrides.num_pairs": 4,
        "data.builder_overrides.num_keys": 8,
        "data.builder_overrides.num_values": 4,
        "data.builder_overrides.num_train": 4096,
        "train_mixture": at_distances(*range(2, 2 * 4 + 1, 2)),
        "eval_data": at_distances(2, 4, 6, 8),
        "model.d_model": 64,
        "model.num_heads": 4,
        "model.num_layers": 2,
        "global_batch_size": 128,
        "num_train_steps": 800,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0, 1),
        "sweep.variants": variants(PATTERNS, depths=(1, 2)),
    },
    # Sized for a GPU/TPU; not run on this machine.
    "full": {
        "data.builder_overrides.num_pairs": 64,
        "data.builder_overrides.num_keys": 128,
        "data.builder_overrides.num_values": 16,
        "data.builder_overrides.num_train": 20_000,
        "train_mixture": at_distances(*range(2, 2 * 64 + 1, 2)),
        "eval_data": at_distances(2, 8, 16, 32, 64, 96, 128),
        "model.d_model": 128,
        "model.num_heads": 4,
        "model.num_layers": 4,
        "global_batch_size": 256,
        "num_train_steps": 20_000,
        "optimizer.learning_rate": 1e-3,
        "sweep.seeds": (0, 1, 2),
        "sweep.variants": variants(PATTERNS, depths=(1, 2, 4)),
    },
}
# Not a config field: how much longer than PATTERNS' the preset's windows and blocks are.
SCALE = {"smoke": 1, "cpu": 1, "full": 8}


def parse_variant(name):
    """(pattern, layers) of "<pattern>-<layers>layers"."""
    pattern, _, layers = name.rpartition("-")
    if pattern not in PATTERNS or not layers.endswith("layers") or not layers[:-6].isdigit():
        raise experiment.unknown(
            "pattern_reach variant",
            name,
            f"'<pattern>-<layers>layers' with pattern in {sorted(PATTERNS)}, e.g. "
            f"'sliding_window-2layers'",
        )
    return pattern, int(layers[: -len("layers")])


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<variant>"; preset in PRESETS (default cpu)."""
    preset, variant = experiment.split(arg, PRESETS)

    config = base_config()
    config.task = "classification"
    config.data = ml_collections.ConfigDict(
        dict(
            name="associative_recall",
            config="pairs64",
            add_cls=False,
            builder_overrides=dict(
                num_pairs=None,
                num_keys=None,
                num_values=None,
                distance=2,
                num_train=None,
                num_validation=256,
                num_test=256,
            ),
        )
    )
    config.model = ml_collections.ConfigDict(
        dict(
            name="encoder_classifier",
            d_model=None,
            num_heads=None,
            d_ff=None,
            num_layers=None,
            pooling="attention",
            positional="rotary",
            norm_position="pre",
            dropout_rate=0.0,
            pattern="full",
            pattern_options={},
            dtype="float32",
        )
    )  # "bfloat16": compute in bfloat16, parameters stay float32
    experiment.set_fields(config, PRESETS[preset])  # None above: set by every preset

    config.model.d_ff = 2 * config.model.d_model
    if variant:
        pattern, config.model.num_layers = parse_variant(variant)
        config.model.pattern, options = PATTERNS[pattern]
        config.model.pattern_options = {
            k: v * SCALE[preset] if k in SCALED else v for k, v in options.items()
        }
    steps = config.num_train_steps
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    config.log_every_steps = max(steps // 4, 1)
    config.eval_steps = 0  # the whole validation split of each distance
    config.optimizer.warmup_steps = max(steps // 10, 1)
    config.optimizer.weight_decay = 0.0
    distances = sorted(data.builder_overrides.distance for data in config.eval_data.values())
    points = tuple((d, f"eval_d{d}/accuracy") for d in distances)
    config.sweep.metrics = tuple(key for _, key in points)
    config.sweep.plot = ml_collections.ConfigDict(
        dict(
            points=points,
            series="model.pattern",
            panel="model.num_layers",
            x_label="distance from the query to its key",
            y_label="accuracy",
        )
    )
    return config
