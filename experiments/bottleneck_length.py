r"""The bottleneck by length: does reversing a sequence fail with its length without attention?

The CPU-sized analogue of Figure 2 of Bahdanau et al. (2015), on a task whose difficulty is its
length alone: reverse a random sequence of symbols (transformer/data/copy_reverse.py). A
decoder that sees the source only through the encoder's final state has to squeeze every
symbol into that one vector; a decoder with attention can look each one up. The models train
on sources of `min_length` to `max_length` symbols and are evaluated on sources of
`min_length` to a longer max_length (`eval_data`), past anything seen in training. Four models, as in
experiments/bottleneck.py (which asks the same question of translation, at accelerator size):
  no_attention  a recurrent (GRU) encoder-decoder whose decoder sees the source only through the
                encoder's final state (Sutskever et al. 2014; Cho et al. 2014's RNNencdec)
  bahdanau      the same with additive attention whose context feeds the next decoder step
                (Bahdanau et al. 2015's RNNsearch)
  luong         the same with Luong et al. (2015)'s attention: "general" score, context
                concatenated with the decoder state before the output layer, input feeding
  transformer   an encoder-decoder transformer (Vaswani et al. 2017), sinusoidal positions
Reported (transformer/evaluation/exact_match.py), from greedy decoding: exact match (the whole
reversal right) and token accuracy, overall, by source length, and over the sources longer
than any in training; the models with attention also draw alignment heatmaps (a reversal is
the anti-diagonal) into runs/<variant>/seed_<seed>/alignments/.

    python launch.py --config=experiments/bottleneck_length.py:cpu --sweep --workdir=/tmp/bl
    python launch.py --config=experiments/bottleneck_length.py:cpu,bahdanau --workdir=/tmp/bah

Presets: "smoke" (tests); "cpu" (sized for 2 cores: 16 symbols, trained on 4 to 24, evaluated
on 4 to 40, GRUs of 128 units, 600 steps); "full" (GPU/TPU, not run here): Bahdanau et al.'s
RNNsearch sizes where they apply (620-dim embeddings, 1000 units, batch 80) and the transformer
base model, 32 symbols, trained on 4 to 128, evaluated on 4 to 192.
"""

import ml_collections

from transformer.evaluation.translation import bucket_names
from transformer.training import experiment
from transformer.training.config_schema import base_config

VARIANTS = experiment.SEQ2SEQ_VARIANTS
EVAL_SET = "lengths"  # results are "eval_lengths/<metric>"


def longer(max_length, size):
    """`eval_data`: `size` sources of the training data's min_length to `max_length` symbols."""
    # num_train: evaluation reads only the validation split.
    overrides = dict(max_length=max_length, num_validation=size, num_train=1)
    return {EVAL_SET: {"builder_overrides": overrides}}


# `data.builder_overrides`: the training data (copy_reverse's fields); `eval_data`: the
# evaluation set, from the training data's min_length to beyond its max_length.
PRESETS = {
    "smoke": {
        "data.builder_overrides": dict(
            min_length=2, max_length=8, num_symbols=8, num_train=256, num_validation=16
        ),
        "eval_data": longer(12, size=32),
        "exact_match_eval.bucket_edges": (4, 9),
        "exact_match_eval.num_alignment_plots": 1,
        "global_batch_size": 16,
        "num_train_steps": 10,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0,),
    },
    "cpu": {
        "data.builder_overrides": dict(
            min_length=4, max_length=24, num_symbols=16, num_train=60_000, num_validation=256
        ),
        "eval_data": longer(40, size=1_024),
        "exact_match_eval.bucket_edges": (8, 12, 16, 20, 25, 30, 35),
        "exact_match_eval.num_alignment_plots": 3,
        "global_batch_size": 64,
        "num_train_steps": 600,
        "optimizer.learning_rate": 1e-2,
        "sweep.seeds": (0, 1, 2),
    },
    # Sized for a GPU/TPU; not run on this machine.
    "full": {
        "data.builder_overrides": dict(
            min_length=4, max_length=128, num_symbols=32, num_train=1_000_000, num_validation=1_000
        ),
        "eval_data": longer(192, size=4_000),
        "exact_match_eval.bucket_edges": (16, 32, 48, 64, 80, 96, 112, 129, 144, 160, 176),
        "exact_match_eval.num_alignment_plots": 5,
        "global_batch_size": 80,
        "num_train_steps": 50_000,
        "optimizer.learning_rate": 5e-4,
        "sweep.seeds": (0, 1, 2),
    },
}
# The model fields of each preset, for the recurrent variants (`model.attention_dim`: those with
# attention only) and for the transformer.
RNN_MODEL = {
    "smoke": {"model.embed_dim": 16, "model.hidden_dim": 32, "model.attention_dim": 16},
    "cpu": {"model.embed_dim": 32, "model.hidden_dim": 128, "model.attention_dim": 64},
    "full": {"model.embed_dim": 620, "model.hidden_dim": 1000, "model.attention_dim": 1000},
}
TRANSFORMER_MODEL = {
    "smoke": {
        "model.d_model": 16,
        "model.num_heads": 2,
        "model.d_ff": 32,
        "model.num_layers": 1,
        "model.num_decoder_layers": 1,
    },
    "cpu": {
        "model.d_model": 64,
        "model.num_heads": 4,
        "model.d_ff": 256,
        "model.num_layers": 2,
        "model.num_decoder_layers": 2,
    },
    "full": {
        "model.d_model": 512,
        "model.num_heads": 8,
        "model.d_ff": 2048,
        "model.num_layers": 6,
        "model.num_decoder_layers": 6,
    },
}


def plot_points(edges, shortest, longest):
    """((x, result key), ...): each bucket at the middle of the lengths it holds, the first from
    `shortest`, the last up to `longest`."""
    lows, highs = (shortest,) + tuple(edges), tuple(edges) + (longest + 1,)
    names = bucket_names(edges, prefix="exact_match_len")
    return tuple(
        ((low + high - 1) / 2, f"eval_{EVAL_SET}/{name}")
        for low, high, name in zip(lows, highs, names)
    )


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<variant>"; preset in PRESETS (default cpu)."""
    preset, variant = experiment.split(arg, PRESETS)
    variant = variant or "bahdanau"
    experiment.check("bottleneck_length variant", variant, VARIANTS)

    config = base_config()
    config.task = "seq2seq"
    config.data = ml_collections.ConfigDict(
        dict(name="copy_reverse", config="reverse64", builder_overrides=None)
    )
    config.model = experiment.seq2seq_model(variant, dropout_rate=0.0, norm_position="pre")
    config.exact_match_eval = ml_collections.ConfigDict(
        dict(strategy="greedy", bucket_edges=None, num_alignment_plots=None)
    )
    model_fields = TRANSFORMER_MODEL[preset] if variant == "transformer" else RNN_MODEL[preset]
    if variant == "no_attention":  # no attention, no attention_dim
        model_fields = {k: v for k, v in model_fields.items() if k != "model.attention_dim"}
    experiment.set_fields(config, PRESETS[preset] | model_fields)  # None above: set by them

    train = config.data.builder_overrides
    longest = config.eval_data[EVAL_SET].builder_overrides.max_length
    if longest < train.max_length:
        raise ValueError(
            f"eval_data.{EVAL_SET}.builder_overrides.max_length={longest} is shorter than the "
            f"training data's max_length={train.max_length}; allowed: >= {train.max_length}."
        )
    steps = config.num_train_steps
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    config.log_every_steps = max(steps // 10, 1)
    config.eval_steps = 0  # the whole evaluation split
    config.optimizer.warmup_steps = max(steps // 20, 1)
    config.sweep.variants = VARIANTS
    # The plot's lines are the variants; the sweep reads a line's name from the run's config.
    config.sweep.variant = variant
    edges = config.exact_match_eval.bucket_edges
    results = lambda names: tuple(f"eval_{EVAL_SET}/{name}" for name in names)
    config.sweep.metrics = (
        results(("exact_match", "token_accuracy"))
        + results(("exact_match_beyond_train", "token_accuracy_beyond_train"))
        + results(bucket_names(edges, prefix="exact_match_len"))
        + results(bucket_names(edges, prefix="token_accuracy_len"))
    )
    config.sweep.plot = ml_collections.ConfigDict(
        dict(
            points=plot_points(edges, train.min_length, longest),
            series="sweep.variant",
            panel="",
            x_label=f"source length (symbols); trained on {train.min_length}-{train.max_length}",
            y_label="exact match (greedy)",
        )
    )
    return config
