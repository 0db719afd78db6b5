r"""Pattern reach: can a model with this attention pattern recall a value stored this far away?

Associative recall with its pairs spread through filler (transformer/data/associative_recall.py,
`length` > 0): a sequence of `length` tokens holds a few (key, value) pair tokens among filler and
ends with a key, the query; the answer is the value stored with that key. The model trains on
examples whose queried pair lies at any distance from the query, so it must find the pair by
content, and is evaluated at one distance at a time. It reads its answer at the query's position
(pooling "last"): the answer must travel from the pair to the query through the layers, and a
token can only use what its pattern lets it see, layer by layer. One sliding-window layer reaches
w positions and each further layer up to w more; anchors (global tokens) relay anything in two
layers; random blocks reach what they happen to draw.

    python launch.py --config=experiments/pattern_reach.py:cpu --sweep --workdir=/tmp/reach
    python launch.py --config=experiments/pattern_reach.py:grid --sweep --workdir=/tmp/reach_grid
    python launch.py --config=experiments/pattern_reach.py:cpu,sliding_window-2layers \
        --workdir=/tmp/reach_one

Presets (PRESETS: config fields): "smoke" (tests); "cpu" (the README's main job, on 2 cores:
128 tokens, a subset of the grid that shows the staircase); "grid" (every pattern at 1 and 2
layers and the window at 3, the same runs as "cpu" otherwise); "full" (GPU/TPU: 1,024 tokens,
windows and blocks 8 times longer, depths 1 to 4). Variants: "<pattern>-<layers>layers", a pattern
of PATTERNS in a model of that many layers, e.g. "sliding_window-2layers".
"""

import ml_collections

from transformer.training import experiment
from transformer.training.config_schema import base_config

# name -> (pattern, pattern_options) for transformer.patterns.build, at the cpu preset's scale
# (128-token sequences); SCALE multiplies the lengths in them. Every pattern but full and causal
# computes about a quarter to a half of the 128 x 128 scores.
PATTERNS = {
    "full": ("full", {}),
    "causal": ("causal", {}),
    "sliding_window": ("sliding_window", {"left": 32}),
    "anchor": ("anchor", {"num_anchors": 16}),
    "random": ("random", {"num_blocks": 2, "block_size": 16}),
    "bigbird": (
        "bigbird",
        {"block_size": 16, "window_blocks": 3, "num_anchor_blocks": 1, "num_random_blocks": 1},
    ),
}
SCALED = ("left", "block_size", "num_anchors")  # the pattern_options that are lengths


def variant_name(pattern, layers):
    return f"{pattern}-{layers}layers"


def variants(patterns, depths):
    return tuple(variant_name(p, depth) for depth in depths for p in patterns)


def at_distances(*distances):
    """{"d<distance>": the data with the queried pair at that distance} for each distance."""
    return {
        f"d{d}": {"builder_overrides": {"distance": d, "num_train": 1}} for d in distances
    }  # num_train: evaluation reads only the validation split


CPU = {
    "data.builder_overrides.length": 128,
    "data.builder_overrides.num_train": 32_768,  # 300 steps x 64 see each example once or less
    "eval_data": at_distances(8, 24, 40, 56, 72, 88, 104, 120),
    "model.d_model": 64,
    "model.num_heads": 4,
    "model.num_layers": 2,
    "global_batch_size": 64,
    "num_train_steps": 300,
    "optimizer.learning_rate": 5e-3,
    "sweep.seeds": (0, 1, 2),
}
PRESETS = {
    "smoke": {
        "data.builder_overrides.length": 32,
        "data.builder_overrides.num_train": 64,
        "eval_data": at_distances(4, 24),
        "model.d_model": 16,
        "model.num_heads": 2,
        "model.num_layers": 2,
        "global_batch_size": 16,
        "num_train_steps": 10,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0,),
        "sweep.variants": variants(("full", "sliding_window"), depths=(2,)),
    },
    # The staircase: the window at 1 and 2 layers against full attention,
    # and the two relays of the window (anchors, BigBird's union) at 2 layers.
    "cpu": {
        **CPU,
        "sweep.variants": (
            "full-1layers",
            "sliding_window-1layers",
            "sliding_window-2layers",
            "anchor-2layers",
            "bigbird-2layers",
        ),
    },
    "grid": {
        **CPU,
        "sweep.variants": variants(PATTERNS, depths=(1, 2)) + ("sliding_window-3layers",),
    },
    # Sized for a GPU/TPU; not run on this machine.
    "full": {
        "data.builder_overrides.length": 1024,
        "data.builder_overrides.num_train": 200_000,
        "eval_data": at_distances(*range(32, 1024, 64)),
        "model.d_model": 128,
        "model.num_heads": 4,
        "model.num_layers": 4,
        "global_batch_size": 256,
        "num_train_steps": 5_000,
        "optimizer.learning_rate": 1e-3,
        "sweep.seeds": (0, 1, 2),
        "sweep.variants": variants(PATTERNS, depths=(1, 2, 3, 4)),
    },
}
# Not a config field: how much longer than PATTERNS' the preset's windows and blocks are.
SCALE = {"smoke": 0.25, "cpu": 1, "grid": 1, "full": 8}


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
            config="spread128",  # 4 (key, value) tokens in filler; training draws any distance
            add_cls=False,
            builder_overrides=dict(length=None, num_train=None, distance=0),
        )
    )
    config.model = ml_collections.ConfigDict(
        dict(
            name="encoder_classifier",
            d_model=None,
            num_heads=None,
            d_ff=None,
            num_layers=None,
            pooling="last",
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
            k: max(int(v * SCALE[preset]), 1) if k in SCALED else v for k, v in options.items()
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
