r"""Positional encodings: trained at one length, evaluated at 1x to 4x that length.

The task is associative recall (transformer/data/associative_recall.py): `k_1 v_1 ... k_n v_n q`,
answer the value stored right after the key q. It needs order, and only local order: a key is
paired with its value by adjacency alone, so a model without positions sees a bag of tokens and
can do no better than guess among the values present, while the rule itself ("the token after
the matching key") is the same at every length. That makes it a clean test of whether an
encoding lets a learned rule carry over to longer inputs and positions never seen in training;
ListOps would mix that with harder reasoning, and copy/reverse with autoregressive decoding.

Training: n pairs (2n + 1 tokens), the queried key at every even distance 2..2n from the query
(a mixture, each batch from one distance), so the model must find the key by content.
Evaluation: k * n pairs for k = 1, 2, 3, 4, the queried key at distance n (the middle of the
trained range, so only the length and the absolute positions are new). Keys are drawn from
one vocabulary of `num_keys` ids (at least 4n, since keys are distinct within the longest
sequence), the same in training and evaluation.

Without positions the best a model can do is guess the value that occurs most often in the
sequence (the input is then a bag of tokens). With 4 values that floor is 0.53 at 4 pairs, 0.44
at 8, 0.41 at 12 and 0.38 at 16 (simulated, ties broken at random): not 1 / num_values.

The learned encoding has a table of max_len vectors; it is sized here to the longest evaluation
sequence (2 * 4n + 1 tokens, padded to 2 * 4n + 2) in every variant. Positions past the training
length 2n + 1 are then never trained: they keep their random initial vectors, which is what "a
learned table does not extrapolate" means in this table. The other encodings have no table
(sinusoidal is computed, rotary and ALiBi act in attention) and ignore max_len.

    python launch.py --config=experiments/positional.py:cpu --sweep --workdir=/tmp/positional
    python launch.py --config=experiments/positional.py:cpu,alibi --workdir=/tmp/alibi

Presets: "smoke" (tests), "cpu" (2 cores: n = 4 pairs, evaluated up to 16 pairs),
"full" (GPU/TPU: n = 32, evaluated up to 128 pairs; not run here). Variants: the encodings.
Plot: accuracy against evaluation length / training length, one line per encoding.

Why the cpu preset trains on 4 pairs for 6,000 steps: with 8 pairs, 64 keys, 8 values and batch 64
(an earlier version), rotary and sinusoidal models alike stayed at the bag-of-tokens floor (0.32)
after 800 and 3,000 steps, at learning rates 3e-3 and 1e-3 and with batch 128: they never found the
recall rule in a CPU budget. With 4 pairs, 16 keys, 4 values and batch 128, a rotary model solves
the training length by about step 1,100, a learned one (at unit-scale initialisation) by about
step 1,250; a sinusoidal one is still at the floor at step 2,000 (at learning rates 3e-3 and 1e-2,
and with 3 layers) and learns the rule partly by step 6,000. Single runs, seed 0.

Sinusoidal positions a step apart are nearly parallel at this width: the mean cosine between the
vectors of positions i and i + 1 over the first 10 positions is 0.97 at d_model 64 (the low
frequencies barely move), so the difference a model must read is a vector of norm about 1.5 next
to token vectors of norm 8. Learned vectors start independent of each other.

ALiBi without a causal mask is symmetric here (-slope * |i - j|, transformer/attention/dense.py): a
value's two neighbours are both keys, its own before it and the next pair's after it, and distance
alone cannot tell which is which. Only the sequence's ends break the symmetry (a token near the
start has fewer keys to its left), so an ALiBi model can pair a value with its key only from such
indirect cues. A variant with a different slope to each side would tell left from right; every
implementation (the block-sparse CPU kernel and splash included) computes the symmetric bias, so
it is not added here.
"""

import ml_collections

from transformer.modules.positional import POSITIONAL_ENCODINGS
from transformer.training import experiment
from transformer.training.config_schema import base_config

LENGTH_FACTORS = (1, 2, 3, 4)

# `data.builder_overrides.num_pairs`: n, the training length; the evaluation sets have k * n.
PRESETS = {
    "smoke": {
        "data.builder_overrides.num_pairs": 2,
        "data.builder_overrides.num_keys": 16,
        "data.builder_overrides.num_values": 4,
        "data.builder_overrides.num_train": 64,
        "data.builder_overrides.num_validation": 32,
        "data.builder_overrides.num_test": 32,
        "model.num_layers": 1,
        "model.d_model": 16,
        "model.num_heads": 2,
        "global_batch_size": 16,
        "num_train_steps": 10,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0,),
        "sweep.variants": ("none", "learned"),
    },
    "cpu": {
        "data.builder_overrides.num_pairs": 4,
        "data.builder_overrides.num_keys": 16,
        "data.builder_overrides.num_values": 4,
        "data.builder_overrides.num_train": 4096,
        "data.builder_overrides.num_validation": 512,
        "data.builder_overrides.num_test": 512,
        "model.num_layers": 2,
        "model.d_model": 64,
        "model.num_heads": 4,
        "global_batch_size": 128,
        "num_train_steps": 6000,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0, 1, 2),
        "sweep.variants": tuple(POSITIONAL_ENCODINGS),
    },
    # Sized for a GPU/TPU; not run on this machine.
    "full": {
        "data.builder_overrides.num_pairs": 32,
        "data.builder_overrides.num_keys": 256,
        "data.builder_overrides.num_values": 16,
        "data.builder_overrides.num_train": 20_000,
        "data.builder_overrides.num_validation": 1000,
        "data.builder_overrides.num_test": 1000,
        "model.num_layers": 4,
        "model.d_model": 128,
        "model.num_heads": 4,
        "global_batch_size": 256,
        "num_train_steps": 20_000,
        "optimizer.learning_rate": 1e-3,
        "sweep.seeds": (0, 1, 2),
        "sweep.variants": tuple(POSITIONAL_ENCODINGS),
    },
}


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<encoding>"; preset in PRESETS (default cpu)."""
    preset, variant = experiment.split(arg, PRESETS)
    variant = variant or "sinusoidal"
    experiment.check("positional variant", variant, POSITIONAL_ENCODINGS)

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
                num_validation=None,
                num_test=None,
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
            positional=variant,
            norm_position="pre",
            dropout_rate=0.0,
            max_len=None,
            pattern="full",
            implementation="auto",
            dtype="float32",
        )
    )
    experiment.set_fields(config, PRESETS[preset])  # None above: set by every preset

    n = config.data.builder_overrides.num_pairs
    config.train_mixture = {
        f"d{d}": {"builder_overrides": {"distance": d}} for d in range(2, 2 * n + 1, 2)
    }
    # Evaluated with the queried key at distance n, the middle of the trained distances.
    config.eval_data = {
        f"x{k}": {"builder_overrides": {"num_pairs": k * n, "distance": n}} for k in LENGTH_FACTORS
    }
    config.model.d_ff = 2 * config.model.d_model
    # The longest evaluation batch: 2 * 4n + 1 tokens, padded to 2 * 4n + 2 (the data leaves
    # room for a [CLS]).
    config.model.max_len = 2 * max(LENGTH_FACTORS) * n + 2
    steps = config.num_train_steps
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    config.log_every_steps = max(steps // 4, 1)
    config.eval_steps = 0  # the whole validation split of each length
    config.optimizer.warmup_steps = max(steps // 10, 1)
    config.optimizer.weight_decay = 0.0
    points = tuple((k, f"eval_x{k}/accuracy") for k in LENGTH_FACTORS)
    config.sweep.metrics = tuple(key for _, key in points)
    config.sweep.plot = ml_collections.ConfigDict(
        dict(
            points=points,
            series="model.positional",
            panel="",
            x_label=f"evaluation length / training length ({2 * n + 1} tokens)",
            y_label="accuracy",
        )
    )
    return config
