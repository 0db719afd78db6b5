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

Presets: "smoke" (tests, seconds), "cpu" (the README's run, minutes on 2 cores), "full"
(GPU/TPU: 129-token sequences, more steps). Variants: "<pattern>-<layers>layers".

The classifier reads out with learned attention pooling over all positions (no [CLS]): the
answer can be formed at the query or at the value (when the value sees the query), so what is
measured is how far apart a query and its pair may be for the pattern to connect them.
"""

import ml_collections

from transformer.training.config_schema import base_config

# name -> (pattern, options) for transformer.patterns.build, at the cpu preset's scale (9-token
# sequences); presets multiply the lengths by their `scale`.
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

PRESETS = {
    # Sequences of 2 * num_pairs + 1 tokens; training on `train_distances` (default: every even
    # distance 2..2 * num_pairs), evaluation at `eval_distances`.
    "smoke": dict(
        num_pairs=4,
        num_keys=8,
        num_values=4,
        train_distances=(2, 8),
        eval_distances=(2, 8),
        depths=(2,),
        patterns=("full", "sliding_window"),
        seeds=(0,),
        steps=10,
        batch=16,
        d_model=16,
        num_heads=2,
        num_train=64,
        learning_rate=3e-3,
        scale=1,
    ),
    "cpu": dict(
        num_pairs=4,
        num_keys=8,
        num_values=4,
        eval_distances=(2, 4, 6, 8),
        depths=(1, 2),
        patterns=tuple(PATTERNS),
        seeds=(0, 1),
        steps=800,
        batch=128,
        d_model=64,
        num_heads=4,
        num_train=4096,
        learning_rate=3e-3,
        scale=1,
    ),
    # Sized for a GPU/TPU; not run on this machine.
    "full": dict(
        num_pairs=64,
        num_keys=128,
        num_values=16,
        eval_distances=(2, 8, 16, 32, 64, 96, 128),
        depths=(1, 2, 4),
        patterns=tuple(PATTERNS),
        seeds=(0, 1, 2),
        steps=20_000,
        batch=256,
        d_model=128,
        num_heads=4,
        num_train=20_000,
        learning_rate=1e-3,
        scale=8,
    ),
}


def variant_name(pattern, layers):
    return f"{pattern}-{layers}layers"


def parse_variant(name):
    pattern, _, layers = name.rpartition("-")
    if pattern not in PATTERNS or not layers.endswith("layers") or not layers[:-6].isdigit():
        raise ValueError(
            f"unknown pattern_reach variant {name!r}; expected "
            f"'<pattern>-<layers>layers' with pattern in {sorted(PATTERNS)}, e.g. "
            f"'sliding_window-2layers'."
        )
    return pattern, int(layers[: -len("layers")])


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<variant>"; preset in PRESETS (default cpu)."""
    preset_name, _, variant = arg.partition(",")
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; allowed: {sorted(PRESETS)}.")
    preset = PRESETS[preset_name]
    pattern, layers = parse_variant(variant) if variant else ("full", max(preset["depths"]))
    name, options = PATTERNS[pattern]
    options = {
        k: v * preset["scale"] if k in ("left", "block_size", "num_anchors") else v
        for k, v in options.items()
    }

    config = base_config()
    config.task = "classification"
    config.data = ml_collections.ConfigDict(
        dict(
            name="associative_recall",
            config="pairs64",
            add_cls=False,
            builder_overrides=dict(
                num_pairs=preset["num_pairs"],
                num_keys=preset["num_keys"],
                num_values=preset["num_values"],
                distance=2,
                num_train=preset["num_train"],
                num_validation=256,
                num_test=256,
            ),
        )
    )
    at = lambda d: {"builder_overrides": {"distance": d}}
    train_distances = preset.get("train_distances") or range(2, 2 * preset["num_pairs"] + 1, 2)
    config.train_mixture = {f"d{d}": at(d) for d in train_distances}
    config.eval_data = {f"d{d}": at(d) for d in preset["eval_distances"]}
    config.model = ml_collections.ConfigDict(
        dict(
            name="encoder_classifier",
            d_model=preset["d_model"],
            num_heads=preset["num_heads"],
            d_ff=2 * preset["d_model"],
            num_layers=layers,
            pooling="attention",
            positional="rotary",
            norm_position="pre",
            dropout_rate=0.0,
            pattern=name,
            pattern_options=options,
            dtype="float32",
        )
    )  # "bfloat16": compute in bfloat16, parameters stay float32
    config.global_batch_size = preset["batch"]
    config.num_train_steps = preset["steps"]
    config.eval_every_steps = preset["steps"]
    config.checkpoint_every_steps = preset["steps"]
    config.log_every_steps = max(preset["steps"] // 4, 1)
    config.eval_steps = 0  # the whole validation split of each distance
    config.optimizer.learning_rate = preset["learning_rate"]
    config.optimizer.warmup_steps = max(preset["steps"] // 10, 1)
    config.optimizer.weight_decay = 0.0
    config.sweep.seeds = preset["seeds"]
    config.sweep.variants = tuple(
        variant_name(p, depth) for depth in preset["depths"] for p in preset["patterns"]
    )
    points = tuple((d, f"eval_d{d}/accuracy") for d in preset["eval_distances"])
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
