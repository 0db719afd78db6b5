r"""ListOps: the attention patterns on the Long Range Arena's hierarchical-reasoning task.

An example is a nested expression such as `[MAX 4 3 [MIN 2 3 ] 1 0 ]` (transformer/data/listops.py);
the answer, one of 10 digits, is its value. Every operator's value depends on arguments that may
sit far apart, so a pattern that cuts long-range paths should lose accuracy, unless depth,
anchors or random blocks relay the information.

    python launch.py --config=experiments/listops.py:cpu --sweep --workdir=/tmp/listops
    python launch.py --config=experiments/listops.py:cpu,bigbird --workdir=/tmp/listops_one

Presets:
  "smoke"  tests, seconds: the `tiny` data (10-60 tokens), a 1-layer model, 10 steps.
  "cpu"    2 cores: 20-100-token expressions (the `small` config, shortened), a 2-layer
           d_model-64 model, 250 steps of batch 32, 2 seeds; windows and blocks of 8 tokens.
  "full"   GPU/TPU, the Long Range Arena's settings (Tay et al., 2020): the `lra` data
           (500-2,000 tokens), 4 layers, d_model 512, 8 heads, MLP 1024, batch 32, 5,000 steps,
           [CLS] pooling, BigBird's block 64 with 3 window, 2 global and 3 random blocks. LRA's
           ListOps test accuracies: Transformer 36.37%, local attention 15.82%, BigBird 36.05%.
           The optimizer is ours (AdamW, inverse-square-root decay after 1,000 warmup steps), not
           a copy of LRA's; LRA reports test accuracy, so compare with `--config.eval_split=test`
           (the sweeps evaluate on validation).
Variants: the patterns in PATTERNS.

Reading out: [CLS] (prepended at position 0) pooling, as in LRA; [CLS] is a global token of the
anchor and BigBird patterns. The `causal` variant reads out with learned attention pooling over
all positions instead: under a causal mask [CLS], being first, would see only itself. The table's
"what each variant changes" lists this. `implementation="auto"` picks chunked attention for
full and causal patterns and block-sparse attention for the sparse ones at long lengths.
"""

import ml_collections

from transformer.data.listops import Listops
from transformer.training.config_schema import base_config


def pattern_options(pattern, preset):
    """(pattern name, options) for transformer.patterns.build at the preset's block size."""
    block = preset["block"]
    return {
        "full": ("full", {}),
        "causal": ("causal", {}),
        "sliding_window": ("sliding_window", {"left": block}),
        "anchor": ("anchor", {"num_anchors": block}),
        "random": ("random", {"num_blocks": preset["random_blocks"], "block_size": block}),
        "bigbird": (
            "bigbird",
            {
                "block_size": block,
                "window_blocks": 3,
                "num_anchor_blocks": preset["anchor_blocks"],
                "num_random_blocks": preset["random_blocks"],
            },
        ),
    }[pattern]


PATTERNS = ("full", "sliding_window", "anchor", "random", "bigbird", "causal")

PRESETS = {
    "smoke": dict(
        data_config="tiny",
        data_overrides={},
        patterns=("full", "sliding_window"),
        seeds=(0,),
        steps=10,
        warmup=1,
        schedule="cosine",
        batch=16,
        num_layers=1,
        d_model=16,
        num_heads=2,
        d_ff=32,
        dropout=0.0,
        learning_rate=3e-3,
        weight_decay=0.0,
        block=4,
        random_blocks=1,
        anchor_blocks=1,
        length_buckets=((10, 34), (35, 60)),
    ),
    # 8,000 training examples of 20-100 tokens: generated once (~10 s), then read from disk.
    # Sized so that the sweep (6 patterns x 2 seeds) takes minutes on 2 cores; an earlier
    # 30-150-token, 500-step version took 9.5 minutes for one run on a loaded machine.
    "cpu": dict(
        data_config="small",
        data_overrides=dict(
            min_length=20, max_length=100, num_train=8000, num_validation=500, num_test=500
        ),
        patterns=PATTERNS,
        seeds=(0, 1),
        steps=250,
        warmup=25,
        schedule="cosine",
        batch=32,
        num_layers=2,
        d_model=64,
        num_heads=4,
        d_ff=128,
        dropout=0.0,
        learning_rate=1e-3,
        weight_decay=0.01,
        block=8,
        random_blocks=2,
        anchor_blocks=1,
        length_buckets=((20, 46), (47, 73), (74, 100)),
    ),
    # Sized for a GPU/TPU; not run on this machine.
    "full": dict(
        data_config="lra",
        data_overrides={},
        patterns=PATTERNS,
        seeds=(0, 1, 2),
        steps=5000,
        warmup=1000,
        schedule="inverse_sqrt",
        batch=32,
        num_layers=4,
        d_model=512,
        num_heads=8,
        d_ff=1024,
        dropout=0.1,
        learning_rate=1e-3,
        weight_decay=0.1,
        block=64,
        random_blocks=3,
        anchor_blocks=2,
        length_buckets=((500, 999), (1000, 1499), (1500, 2000)),
    ),
}


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<pattern>"; preset in PRESETS (default cpu)."""
    preset_name, _, variant = arg.partition(",")
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; allowed: {sorted(PRESETS)}.")
    if variant and variant not in PATTERNS:
        raise ValueError(f"unknown listops variant {variant!r}; allowed: {list(PATTERNS)}.")
    preset = PRESETS[preset_name]
    pattern = variant or "full"
    name, options = pattern_options(pattern, preset)

    config = base_config()
    config.task = "classification"
    # The fields the length buckets below replace must be there to be replaced: spelled out with
    # the named config's own values (which names the prepared copy after them, same data).
    named = Listops.builder_configs[preset["data_config"]]
    overrides = {
        field: getattr(named, field) for field in ("min_length", "max_length", "num_train", "seed")
    }
    config.data = ml_collections.ConfigDict(
        dict(
            name="listops",
            config=preset["data_config"],
            add_cls=True,
            builder_overrides={**overrides, **preset["data_overrides"]},
        )
    )
    # "all": the validation split of the training data; "len<a>_<b>": validation expressions of
    # a to b tokens only (a data set of its own: seed 1, and no training split to speak of).
    config.eval_data = {"all": {}}
    for low, high in preset["length_buckets"]:
        config.eval_data[f"len{low}_{high}"] = {
            "builder_overrides": dict(min_length=low, max_length=high, num_train=1, seed=1)
        }
    config.model = ml_collections.ConfigDict(
        dict(
            name="encoder_classifier",
            d_model=preset["d_model"],
            num_heads=preset["num_heads"],
            d_ff=preset["d_ff"],
            num_layers=preset["num_layers"],
            pooling="attention" if pattern == "causal" else "cls",
            positional="sinusoidal",
            norm_position="pre",
            dropout_rate=preset["dropout"],
            # No attention dropout (LRA's is 0.1): it needs the dense implementation.
            pattern=name,
            pattern_options=options,
            implementation="auto",
            dtype="float32",
        )
    )
    config.global_batch_size = preset["batch"]
    config.num_train_steps = preset["steps"]
    config.eval_every_steps = preset["steps"]
    config.checkpoint_every_steps = preset["steps"]
    config.log_every_steps = max(preset["steps"] // 10, 1)
    config.eval_steps = 0  # the whole validation split of each evaluation set
    config.optimizer.schedule = preset["schedule"]
    config.optimizer.learning_rate = preset["learning_rate"]
    config.optimizer.warmup_steps = preset["warmup"]
    config.optimizer.weight_decay = preset["weight_decay"]
    config.sweep.seeds = preset["seeds"]
    config.sweep.variants = tuple(preset["patterns"])
    points = tuple(
        ((low + high) // 2, f"eval_len{low}_{high}/accuracy")
        for low, high in preset["length_buckets"]
    )
    config.sweep.metrics = (
        ("eval_all/accuracy", "eval_all/loss")
        + tuple(key for _, key in points)
        + ("train/tokens_per_second",)
    )
    config.sweep.plot = ml_collections.ConfigDict(
        dict(
            points=points,
            series="model.pattern",
            panel="",
            x_label="expression length (tokens, middle of each length bucket)",
            y_label="validation accuracy",
        )
    )
    return config
