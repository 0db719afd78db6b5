r"""The bottleneck: does translation quality fall with sentence length without attention?

English to Spanish Bible verses (transformer/data/bible_en_es.py: King James / Reina-Valera
1909, about 28,000 training pairs, SentencePiece vocabulary). Four models:
  no_attention  a recurrent encoder-decoder whose decoder sees the source only through the
                encoder's final state (Sutskever et al. 2014; Cho et al. 2014's RNNencdec)
  bahdanau      the same with additive attention whose context feeds the next decoder step
                (Bahdanau et al. 2015's RNNsearch)
  luong         the same with Luong et al. (2015)'s attention: "general" score, context
                concatenated with the decoder state before the output layer, input feeding
  transformer   an encoder-decoder transformer (Vaswani et al. 2017)
Reported: BLEU (sacrebleu, detokenized) of the greedy (cpu) or beam (full) translations of the
validation verses, overall and by source length in words, as Figure 2 of Bahdanau et al. plots
it (transformer/evaluation/translation.py); the models with attention over the source (the transformer:
its last cross-attention layer, averaged over heads) also write alignment heatmaps of a few
validation verses to runs/<variant>/seed_<seed>/alignments/.

    python launch.py --config=experiments/bottleneck.py:cpu --sweep --workdir=/tmp/bottleneck
    python launch.py --config=experiments/bottleneck.py:cpu,bahdanau --workdir=/tmp/bahdanau

Presets: "smoke" (tests: Genesis only); "cpu" (2 cores: small GRUs and a small transformer,
short training); "full" (GPU/TPU, not run here):
Bahdanau et al.'s RNNsearch sizes where they apply (GRUs, 620-dim embeddings, 1000-unit decoder
and alignment model, a bidirectional encoder, batch 80, beam search) and the transformer base
model. Differences from the paper: AdamW instead of Adadelta, no maxout output layer, the data's
8,000-piece vocabulary instead of 30,000 words, and each encoder direction has hidden_dim / 2 =
500 units (the paper's have 1000).
"""

import ml_collections

from transformer.evaluation.translation import bucket_names
from transformer.training import experiment
from transformer.training.config_schema import base_config

VARIANTS = experiment.SEQ2SEQ_VARIANTS

# `data.builder_overrides` {}: the data config's own vocabulary (tiny 600, verses 8,000
# SentencePiece pieces). `data.length_buckets` None: every batch padded to max_length, one shape
# to compile. The model's fields are in RNN_MODEL and TRANSFORMER_MODEL below.
PRESETS = {
    "smoke": {
        "data.config": "tiny",
        "data.builder_overrides": {},
        "data.max_length": 48,
        "data.max_target_length": 48,
        "data.length_buckets": None,
        "translation_eval.strategy": "greedy",
        "translation_eval.beam_size": 1,
        "translation_eval.max_decode_len": 16,
        "translation_eval.num_examples": 16,
        "translation_eval.bucket_edges": (10, 20, 30),
        "translation_eval.num_alignment_plots": 1,
        "global_batch_size": 16,
        "num_train_steps": 10,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0,),
    },
    "cpu": {
        "data.config": "verses",
        "data.builder_overrides": {"vocab_size": 2000},
        "data.max_length": 96,
        "data.max_target_length": 96,
        "data.length_buckets": None,
        "translation_eval.strategy": "greedy",
        "translation_eval.beam_size": 1,
        "translation_eval.max_decode_len": 96,
        "translation_eval.num_examples": 0,
        "translation_eval.bucket_edges": (10, 20, 30, 40, 50),
        "translation_eval.num_alignment_plots": 3,
        "global_batch_size": 32,
        "num_train_steps": 400,
        "optimizer.learning_rate": 3e-3,
        "sweep.seeds": (0, 1),
    },
    # Sized for a GPU/TPU; not run on this machine.
    "full": {
        "data.config": "verses",
        "data.builder_overrides": {},
        "data.max_length": 256,
        "data.max_target_length": 256,
        "data.length_buckets": (32, 64, 128, 256),
        "translation_eval.strategy": "beam",
        "translation_eval.beam_size": 10,
        "translation_eval.max_decode_len": 256,
        "translation_eval.num_examples": 0,
        "translation_eval.bucket_edges": (10, 20, 30, 40, 50),
        "translation_eval.num_alignment_plots": 5,
        "global_batch_size": 80,
        "num_train_steps": 100_000,
        "optimizer.learning_rate": 5e-4,
        "sweep.seeds": (0, 1, 2),
    },
}
# The model fields of each preset, for the recurrent variants (`model.attention_dim`: those with
# attention only) and for the transformer.
RNN_MODEL = {
    "smoke": {
        "model.embed_dim": 16,
        "model.hidden_dim": 32,
        "model.attention_dim": 16,
        "model.dropout_rate": 0.0,
    },
    "cpu": {
        "model.embed_dim": 64,
        "model.hidden_dim": 128,
        "model.attention_dim": 64,
        "model.dropout_rate": 0.0,
    },
    "full": {
        "model.embed_dim": 620,
        "model.hidden_dim": 1000,
        "model.attention_dim": 1000,
        "model.dropout_rate": 0.0,
    },
}
TRANSFORMER_MODEL = {
    "smoke": {
        "model.d_model": 16,
        "model.num_heads": 2,
        "model.d_ff": 32,
        "model.num_layers": 1,
        "model.num_decoder_layers": 1,
        "model.dropout_rate": 0.0,
        "model.norm_position": "pre",
    },
    "cpu": {
        "model.d_model": 64,
        "model.num_heads": 4,
        "model.d_ff": 256,
        "model.num_layers": 2,
        "model.num_decoder_layers": 2,
        "model.dropout_rate": 0.0,
        "model.norm_position": "pre",
    },
    "full": {
        "model.d_model": 512,
        "model.num_heads": 8,
        "model.d_ff": 2048,
        "model.num_layers": 6,
        "model.num_decoder_layers": 6,
        "model.dropout_rate": 0.1,
        "model.norm_position": "post",
    },
}


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<variant>"; preset in PRESETS (default cpu)."""
    preset, variant = experiment.split(arg, PRESETS)
    variant = variant or "bahdanau"
    experiment.check("bottleneck variant", variant, VARIANTS)

    config = base_config()
    config.task = "seq2seq"
    config.data = ml_collections.ConfigDict(
        dict(
            name="bible_en_es",
            config=None,
            source_language="en",
            builder_overrides=None,
            max_length=None,
            max_target_length=None,
            length_buckets=None,
            sort_window=None,
        )
    )
    config.model = experiment.seq2seq_model(variant)
    config.translation_eval = ml_collections.ConfigDict(
        dict(
            strategy=None,
            beam_size=None,
            max_decode_len=None,
            num_examples=None,
            bucket_edges=None,
            num_alignment_plots=None,
        )
    )
    model_fields = TRANSFORMER_MODEL[preset] if variant == "transformer" else RNN_MODEL[preset]
    if variant == "no_attention":  # no attention, no attention_dim
        model_fields = {k: v for k, v in model_fields.items() if k != "model.attention_dim"}
    experiment.set_fields(config, PRESETS[preset] | model_fields)  # None above: set by them

    # Batches of similar lengths waste less padding, when they are padded to buckets.
    config.data.sort_window = 16 if config.data.length_buckets else 1
    steps = config.num_train_steps
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    config.log_every_steps = max(steps // 10, 1)
    config.eval_steps = 0  # the whole validation split
    config.optimizer.warmup_steps = max(steps // 20, 1)
    config.sweep.variants = VARIANTS
    # The plot's lines are the variants; the sweep reads a line's name from the run's config.
    config.sweep.variant = variant
    bucket_edges = config.translation_eval.bucket_edges
    edges = (0,) + bucket_edges
    # x: the middle of each bucket; the open last one as wide as the one before it.
    middles = [(low + high) / 2 for low, high in zip(edges, edges[1:])]
    middles.append(edges[-1] + (edges[-1] - edges[-2]) / 2)
    names = [f"eval/{name}" for name in bucket_names(bucket_edges)]
    points = tuple(zip(middles, names))
    config.sweep.metrics = ("eval/bleu",) + tuple(names) + ("eval/loss",)
    config.sweep.plot = ml_collections.ConfigDict(
        dict(
            points=points,
            series="sweep.variant",
            panel="",
            x_label="source sentence length (English words)",
            y_label="BLEU",
        )
    )
    return config
