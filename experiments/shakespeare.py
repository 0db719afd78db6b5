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

Presets: "smoke" (tests); "cpu" (2 cores: 512-byte contexts, 64-byte windows, a 2-layer
d_model-64 model, 200 steps of 8 x 512 bytes, evaluated on the first 20 x 8 windows of the
validation plays, about 82 KB); "full" (GPU/TPU: 2,048-byte contexts, 256-byte
windows, 8 layers, d_model 512; not run here). Variants: the patterns above (VARIANTS; WINDOW
has each preset's window). A window saves
time only in contexts several times longer than it: at the cpu preset's 512 bytes, a 64-byte
window leaves out about 3/4 of the causal score matrix (the full preset's 256 of 2,048 too).
"""

import ml_collections

from transformer.training import experiment
from transformer.training.config_schema import base_config

VARIANTS = ("full", "sliding_window", "window_anchors")


def pattern_of(variant, window):
    """(pattern, pattern_options) of a variant for transformer.patterns.build; the decoder
    intersects every pattern with causal()."""
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


# `data.max_length`: the context, in bytes. `eval_steps`: the first eval_steps batches of the
# (unshuffled) validation plays, the same text for every run; 0: all of it.
PRESETS = {
    "smoke": {
        "data.max_length": 32,
        "model.num_layers": 1,
        "model.d_model": 16,
        "model.num_heads": 2,
        "model.d_ff": 32,
        "model.dropout_rate": 0.0,
        "global_batch_size": 8,
        "num_train_steps": 10,
        "eval_steps": 2,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0,),
    },
    # 200 steps of 8 x 512 bytes (0.8 MB of text, a fifth of the training plays): a short run,
    # so that the sweep (3 patterns x 2 seeds) fits a CPU budget.
    "cpu": {
        "data.max_length": 512,
        "model.num_layers": 2,
        "model.d_model": 64,
        "model.num_heads": 4,
        "model.d_ff": 256,
        "model.dropout_rate": 0.0,
        "global_batch_size": 8,
        "num_train_steps": 200,
        "eval_steps": 20,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0, 1),
    },
    # Sized for a GPU/TPU; not run on this machine.
    "full": {
        "data.max_length": 2048,
        "model.num_layers": 8,
        "model.d_model": 512,
        "model.num_heads": 8,
        "model.d_ff": 2048,
        "model.dropout_rate": 0.1,
        "global_batch_size": 32,
        "num_train_steps": 20_000,
        "eval_steps": 0,
        "optimizer.learning_rate": 6e-4,
        "sweep.seeds": (0, 1, 2),
    },
}
# Not a config field: the window of the sliding_window and window_anchors variants, in bytes.
WINDOW = {"smoke": 8, "cpu": 64, "full": 256}


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<variant>"; preset in PRESETS (default cpu)."""
    preset, variant = experiment.split(arg, PRESETS)
    variant = variant or "full"
    experiment.check("shakespeare variant", variant, VARIANTS)
    pattern, pattern_options = pattern_of(variant, WINDOW[preset])

    config = base_config()
    config.task = "language_modelling"
    config.data = ml_collections.ConfigDict(dict(name="shakespeare", max_length=None))
    config.model = ml_collections.ConfigDict(
        dict(
            name="decoder_lm",
            d_model=None,
            num_heads=None,
            d_ff=None,
            num_layers=None,
            positional="rotary",
            norm_position="pre",
            dropout_rate=None,
            pattern=pattern,
            pattern_options=pattern_options,
            implementation="auto",
            dtype="float32",
        )
    )
    experiment.set_fields(config, PRESETS[preset])  # None above: set by every preset

    steps = config.num_train_steps
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    config.log_every_steps = max(steps // 10, 1)
    config.optimizer.warmup_steps = max(steps // 10, 1)
    config.sweep.variants = VARIANTS
    config.sweep.metrics = ("eval/bits_per_target", "eval/accuracy", "train/tokens_per_second")
    # One point per pattern (mean and spread over seeds): the bits a pattern costs. Its speed is
    # in the table.
    config.sweep.plot = ml_collections.ConfigDict(
        dict(
            points=((config.data.max_length, "eval/bits_per_target"),),
            series="model.pattern",
            panel="",
            x_label="context (bytes)",
            y_label="validation bits per character",
        )
    )
    return config
