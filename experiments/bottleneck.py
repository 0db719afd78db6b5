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

Presets: "smoke" (tests, seconds: Genesis only); "cpu" (2 cores, about 15 minutes for the
sweep: small GRUs and a small transformer, short training); "full" (GPU/TPU, not run here):
Bahdanau et al.'s RNNsearch sizes where they apply (GRUs, 620-dim embeddings, 1000-unit decoder
and alignment model, a bidirectional encoder, batch 80, beam search) and the transformer base
model. Differences from the paper: AdamW instead of Adadelta, no maxout output layer, the data's
8,000-piece vocabulary instead of 30,000 words, and each encoder direction has hidden_dim / 2 =
500 units (the paper's have 1000).
"""

import ml_collections

from transformer.evaluation.translation import bucket_names
from transformer.training.config_schema import base_config

VARIANTS = ("no_attention", "bahdanau", "luong", "transformer")
RNN_ATTENTION = {"no_attention": "none", "bahdanau": "bahdanau", "luong": "luong"}

# vocab_size None: the data config's own (tiny 600, verses 8,000 SentencePiece pieces).
# length_buckets None: every batch padded to max_length, one shape to compile.
PRESETS = {
    "smoke": dict(
        data_config="tiny",
        vocab_size=None,
        max_length=48,
        length_buckets=None,
        seeds=(0,),
        steps=10,
        batch=16,
        embed_dim=16,
        hidden_dim=32,
        attention_dim=16,
        rnn_dropout=0.0,
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_layers=1,
        transformer_dropout=0.0,
        norm_position="pre",
        learning_rate=3e-3,
        strategy="greedy",
        beam_size=1,
        max_decode_len=16,
        num_examples=16,
        bucket_edges=(10, 20, 30),
        alignment_plots=1,
    ),
    "cpu": dict(
        data_config="verses",
        vocab_size=2000,
        max_length=96,
        length_buckets=None,
        seeds=(0, 1),
        steps=400,
        batch=32,
        embed_dim=64,
        hidden_dim=128,
        attention_dim=64,
        rnn_dropout=0.0,
        d_model=64,
        num_heads=4,
        d_ff=256,
        num_layers=2,
        transformer_dropout=0.0,
        norm_position="pre",
        learning_rate=3e-3,
        strategy="greedy",
        beam_size=1,
        max_decode_len=96,
        num_examples=0,
        bucket_edges=(10, 20, 30, 40, 50),
        alignment_plots=3,
    ),
    # Sized for a GPU/TPU; not run on this machine.
    "full": dict(
        data_config="verses",
        vocab_size=None,
        max_length=256,
        length_buckets=(32, 64, 128, 256),
        seeds=(0, 1, 2),
        steps=100_000,
        batch=80,
        embed_dim=620,
        hidden_dim=1000,
        attention_dim=1000,
        rnn_dropout=0.0,
        d_model=512,
        num_heads=8,
        d_ff=2048,
        num_layers=6,
        transformer_dropout=0.1,
        norm_position="post",
        learning_rate=5e-4,
        strategy="beam",
        beam_size=10,
        max_decode_len=256,
        num_examples=0,
        bucket_edges=(10, 20, 30, 40, 50),
        alignment_plots=5,
    ),
}


def model_config(variant, preset):
    if variant in RNN_ATTENTION:
        fields = dict(
            name="rnn_seq2seq",
            cell="gru",
            bidirectional=True,
            embed_dim=preset["embed_dim"],
            hidden_dim=preset["hidden_dim"],
            attention=RNN_ATTENTION[variant],
            dropout_rate=preset["rnn_dropout"],
        )
        if variant != "no_attention":
            fields["attention_dim"] = preset["attention_dim"]
        return ml_collections.ConfigDict(fields)
    return ml_collections.ConfigDict(
        dict(
            name="encoder_decoder",
            d_model=preset["d_model"],
            num_heads=preset["num_heads"],
            d_ff=preset["d_ff"],
            num_layers=preset["num_layers"],
            num_decoder_layers=preset["num_layers"],
            dropout_rate=preset["transformer_dropout"],
            positional="sinusoidal",
            norm_position=preset["norm_position"],
            share_embeddings=True,
            tie_output_embedding=True,
            dtype="float32",
        )
    )


def get_config(arg="cpu"):
    """arg: "<preset>" or "<preset>,<variant>"; preset in PRESETS (default cpu)."""
    preset_name, _, variant = arg.partition(",")
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; allowed: {sorted(PRESETS)}.")
    if variant and variant not in VARIANTS:
        raise ValueError(f"unknown bottleneck variant {variant!r}; allowed: {list(VARIANTS)}.")
    preset = PRESETS[preset_name]
    variant = variant or "bahdanau"

    config = base_config()
    config.task = "seq2seq"
    config.data = ml_collections.ConfigDict(
        dict(
            name="bible_en_es",
            config=preset["data_config"],
            source_language="en",
            builder_overrides=(
                {"vocab_size": preset["vocab_size"]} if preset["vocab_size"] else {}
            ),
            max_length=preset["max_length"],
            max_target_length=preset["max_length"],
            length_buckets=preset["length_buckets"],
            # Batches of similar lengths waste less padding, when they are padded to buckets.
            sort_window=16 if preset["length_buckets"] else 1,
        )
    )
    config.model = model_config(variant, preset)
    config.translation_eval = ml_collections.ConfigDict(
        dict(
            strategy=preset["strategy"],
            beam_size=preset["beam_size"],
            max_decode_len=preset["max_decode_len"],
            num_examples=preset["num_examples"],
            bucket_edges=preset["bucket_edges"],
            num_alignment_plots=preset["alignment_plots"],
        )
    )
    config.global_batch_size = preset["batch"]
    config.num_train_steps = preset["steps"]
    config.eval_every_steps = preset["steps"]
    config.checkpoint_every_steps = preset["steps"]
    config.log_every_steps = max(preset["steps"] // 10, 1)
    config.eval_steps = 0  # the whole validation split
    config.optimizer.learning_rate = preset["learning_rate"]
    config.optimizer.warmup_steps = max(preset["steps"] // 20, 1)
    config.sweep.seeds = preset["seeds"]
    config.sweep.variants = VARIANTS
    # The plot's lines are the variants; the sweep reads a line's name from the run's config.
    config.sweep.variant = variant
    edges = (0,) + preset["bucket_edges"]
    # x: the middle of each bucket; the open last one as wide as the one before it.
    middles = [(low + high) / 2 for low, high in zip(edges, edges[1:])]
    middles.append(edges[-1] + (edges[-1] - edges[-2]) / 2)
    names = [f"eval/{name}" for name in bucket_names(preset["bucket_edges"])]
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
