r"""Character (byte) language modelling on Shakespeare: what a causal window costs in bits and buys
in speed.

A decoder-only model predicts each byte of the plays (transformer/data/shakespeare.py; whole
plays are held out for validation) from the bytes before it in its context (a window of the text
of `context` bytes), with one of three causal patterns:
  full            every earlier byte of the context (the decoder's causal mask)
  sliding_window  the last `window` bytes only
  window_anchors  the same window plus the context's first window / 2 bytes as global tokens
                  (BigBird's union without random blocks, intersected with causal)
Reported: bits per character (the validation cross-entropy in bits, `eval/bits_per_target`) and
training tokens/s (`train/tokens_per_second`: the last logging interval, compilation excluded;
runs.csv has each run's average over the whole run).

    python launch.py --config=experiments/shakespeare.py:cpu --sweep --workdir=/tmp/shakespeare
    python launch.py --config=experiments/shakespeare.py:cpu,sliding_window --workdir=/tmp/sw

Presets: "smoke" (tests, seconds); "cpu" (2 cores: 512-byte contexts, 64-byte windows, a 2-layer
d_model-64 model, 200 steps of 8 x 512 bytes, evaluated on the first 20 x 8 windows of the
validation plays, about 82 KB); "full" (GPU/TPU: 2,048-byte contexts, 256-byte
windows, 8 layers, d_model 512; not run here). Variants: the patterns above. A window saves
time only in contexts several times longer than it: at the cpu preset's 512 bytes, a 64-byte
window leaves out about 3/4 of the causal score matrix (the full preset's 256 of 2,048 too).
"""

import ml_collections

from transformer.training.config_schema import base_config

VARIANTS = ("full", "sliding_window", "window_anchors")

PRESETS = {
    "smoke": dict(
        context=32,
        window=8,
        seeds=(0,),
        steps=10,
        batch=8,
        num_layers=1,
        d_model=16,
        num_heads=2,
        d_ff=32,
        dropout=0.0,
        learning_rate=3e-3,
        eval_steps=2,
    ),
    # 200 steps of 8 x 512 bytes (0.8 MB of text, a fifth of the training plays): a short run,
    # so that the sweep (3 patterns x 2 seeds) takes minutes on 2 cores.
    "cpu": dict(
        context=512,
        window=64,
        seeds=(0, 1),
        steps=200,
        batch=8,
        num_layers=2,
        d_model=64,
        num_heads=4,
        d_ff=256,
        dropout=0.0,
        learning_rate=3e-3,
        eval_steps=20,
    ),
    # Sized for a GPU/TPU; not run on this machine.
    "full": dict(
        context=2048,
        window=256,
        seeds=(0, 1, 2),
        steps=20_000,
        batch=32,
        num_layers=8,
        d_model=512,
        num_heads=8,
        d_ff=2048,
        dropout=0.1,
        learning_rate=6e-4,
        eval_steps=0,
    ),
}


def pattern_options(variant, window):
    """(pattern name, options); the decoder intersects every pattern with causal()."""
    # bigbird's window reaches block_size * (window_blocks // 2) = window positions back, as the
    # sliding window does; its first block (window / 2 bytes) holds the anchors.
    return {
        "full": ("full", {}),
        "sliding_window": ("sliding_window", {"left": window}),
        "window_anchors": (
            "bigbird",
            {
                "block_size": window // 2,
                "window_blocks": 5,
                "num_anchor_blocks": 1,
                "num_random_blocks": 0,
            },
        ),
    }[variant]


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<variant>"; preset in PRESETS (default cpu)."""
    preset_name, _, variant = arg.partition(",")
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; allowed: {sorted(PRESETS)}.")
    if variant and variant not in VARIANTS:
        raise ValueError(f"unknown shakespeare variant {variant!r}; allowed: {list(VARIANTS)}.")
    preset = PRESETS[preset_name]
    name, options = pattern_options(variant or "full", preset["window"])

    config = base_config()
    config.task = "language_modelling"
    config.data = ml_collections.ConfigDict(dict(name="shakespeare", max_length=preset["context"]))
    config.model = ml_collections.ConfigDict(
        dict(
            name="decoder_lm",
            d_model=preset["d_model"],
            num_heads=preset["num_heads"],
            d_ff=preset["d_ff"],
            num_layers=preset["num_layers"],
            positional="rotary",
            norm_position="pre",
            dropout_rate=preset["dropout"],
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
    # The first eval_steps batches of the (unshuffled) validation plays: the same text for
    # every run. 0: all of it.
    config.eval_steps = preset["eval_steps"]
    config.optimizer.learning_rate = preset["learning_rate"]
    config.optimizer.warmup_steps = max(preset["steps"] // 10, 1)
    config.sweep.seeds = preset["seeds"]
    config.sweep.variants = VARIANTS
    config.sweep.metrics = ("eval/bits_per_target", "eval/accuracy", "train/tokens_per_second")
    # One point per pattern (mean and spread over seeds): the bits a pattern costs. Its speed is
    # in the table.
    config.sweep.plot = ml_collections.ConfigDict(
        dict(
            points=((preset["context"], "eval/bits_per_target"),),
            series="model.pattern",
            panel="",
            x_label="context (bytes)",
            y_label="validation bits per character",
        )
    )
    return config
