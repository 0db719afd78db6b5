"""BLEU by source length (transformer/evaluation/translation.py) and the bottleneck experiment's sweep."""

import dataclasses
import functools
import math

import ml_collections
import pytest
from experiment_files import load_experiment

from transformer.evaluation import translation
from transformer.token_ids import EOS_ID, PAD_ID
from transformer.training import sweep

SENTENCES = [  # (source length in words, reference)
    (5, "in the beginning god created the heaven and the earth"),
    (8, "and the earth was without form and void"),
    (14, "and god said let there be light and there was light"),
    (25, "and god saw the light that it was good and god divided the light from the darkness"),
]
DISJOINT = "xx yy zz ww vv uu tt ss rr qq"


def score(hypotheses, edges=(10, 20)):
    lengths = [length for length, _ in SENTENCES]
    references = [reference for _, reference in SENTENCES]
    return translation.bleu_by_length(hypotheses, references, lengths, edges)


def test_identical_translations_score_100_in_every_bucket():
    scores = score([reference for _, reference in SENTENCES])
    assert scores == pytest.approx(
        {"bleu": 100.0, "bleu_len_0_10": 100.0, "bleu_len_10_20": 100.0, "bleu_len_20_up": 100.0}
    )


def test_disjoint_translations_score_0():
    assert all(value == 0.0 for value in score([DISJOINT] * len(SENTENCES)).values())


def test_buckets_partition_the_sentences_by_source_length():
    # Right in the short bucket (lengths 5 and 8), wrong elsewhere: each bucket scores only its
    # own sentences, and the whole set lies in between.
    hypotheses = [SENTENCES[0][1], SENTENCES[1][1], DISJOINT, DISJOINT]
    scores = score(hypotheses)
    assert scores["bleu_len_0_10"] == pytest.approx(100.0)
    assert scores["bleu_len_10_20"] == scores["bleu_len_20_up"] == 0.0
    assert 0.0 < scores["bleu"] < 100.0
    # An edge belongs to the bucket above it; empty buckets are left out, not scored 0.
    scores = score(hypotheses, edges=(8, 30))
    assert set(scores) == {"bleu", "bleu_len_0_8", "bleu_len_8_30"}
    assert scores["bleu_len_0_8"] == pytest.approx(100.0)


def test_bucket_names_close_with_an_open_bucket():
    assert translation.bucket_names((10, 20)) == [
        "bleu_len_0_10",
        "bleu_len_10_20",
        "bleu_len_20_up",
    ]


def test_until_eos_keeps_the_eos_and_drops_padding():
    assert translation.until_eos([5, 6, EOS_ID, 7, PAD_ID]) == [5, 6, EOS_ID]
    assert translation.until_eos([5, 6, PAD_ID]) == [5, 6]


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"beam": 4}, r"unknown translation_eval field\(s\) \['beam'\]; allowed: .*'beam_size'"),
        ({"strategy": "sample"}, r"strategy='sample'; allowed: \['greedy', 'beam'\]"),
        ({"bucket_edges": (20, 10)}, r"bucket_edges must be ascending"),
        ({"beam_size": 0}, r"beam_size must be >= 1"),
    ],
)
def test_a_wrong_translation_eval_field_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        translation.resolve(fields)


def test_translation_eval_needs_a_data_set_with_a_sentencepiece_model():
    data = ml_collections.ConfigDict(dict(name="copy_reverse"))
    with pytest.raises(
        ValueError, match=r"data set 'copy_reverse' has none. Allowed: \['bible_en_es'\]"
    ):
        translation.check({"strategy": "greedy"}, data)
    settings = translation.check({"bucket_edges": (5, 10)}, dict(name="bible_en_es"))
    assert translation.metric_names(settings) == [
        "bleu",
        "bleu_len_0_5",
        "bleu_len_5_10",
        "bleu_len_10_up",
    ]


def test_transformer_alignment_is_its_last_cross_attention_over_real_source_tokens():
    import jax
    import numpy as np

    from transformer.modules.models import EncoderDecoder, TransformerConfig

    config = TransformerConfig(
        vocab_size=20,
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=2,
        max_len=16,
        dropout_rate=0.0,
    )
    model = EncoderDecoder(config)
    source = np.array([[5, 6, 7, EOS_ID, PAD_ID, PAD_ID]])
    target = np.array([[8, 9, EOS_ID]])
    params = jax.jit(model.init)(jax.random.key(0), source, target)["params"]
    from transformer.evaluation.alignment import alignment_weights

    weights = alignment_weights(model, params, source, target)
    assert weights.shape == (3, 6)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert (weights[:, 4:] == 0).all() and (weights[:, :4] > 0).all()
    # The last decoder layer's, not the first's.
    sowing = model.clone(
        config=dataclasses.replace(config, sow_attention_weights=True, implementation="dense")
    )
    apply = jax.jit(functools.partial(sowing.apply, mutable=["intermediates"]))
    _, state = apply({"params": params}, source, target)
    layers = state["intermediates"]["decoder"]
    first = layers["layers_0"]["cross_attention"]["attention_weights"][0][0].mean(0)
    last = layers["layers_1"]["cross_attention"]["attention_weights"][0][0].mean(0)
    np.testing.assert_allclose(weights, last, rtol=1e-6)
    assert not np.allclose(first, last)


def test_smoke_preset_sweeps_end_to_end_with_bleu_by_length(tmp_path):
    experiment = load_experiment("bottleneck.py").get_config
    variants = ("bahdanau", "transformer")  # attention weights to plot, and a key/value cache

    def get_config(arg):
        config = experiment(arg)
        config.sweep.variants = variants
        return config

    plan = get_config("smoke").sweep
    records = sweep.run_sweep(
        get_config, "smoke", str(tmp_path), {"data_dir": str(tmp_path / "tfds")}
    )

    assert [r["variant"] for r in records] == list(variants)
    for record in records:
        results = record["results"]
        assert 0.0 <= results["eval/bleu"] <= 100.0
        buckets = [key for _, key in plan.plot.points if key in results]
        assert buckets, "no source-length bucket was scored"
        assert all(0.0 <= results[key] <= 100.0 for key in buckets)
        assert math.isfinite(results["eval/loss"])
    table = (tmp_path / "results.md").read_text()
    assert "| variant | runs | eval/bleu | eval/bleu_len_0_10 |" in table
    assert (tmp_path / "plot.png").stat().st_size > 1000
    # Alignment heatmaps for the models with attention over the source.
    for variant in ("bahdanau", "transformer"):
        alignments = tmp_path / "runs" / variant / "seed_0" / "alignments"
        assert [p for p in alignments.rglob("*.png")], variant


def test_only_models_with_attention_over_the_source_draw_alignments():
    from transformer.modules.models import EncoderDecoder, TransformerConfig
    from transformer.modules.rnn.seq2seq import RNNSeq2Seq

    assert translation.has_attention_weights(EncoderDecoder(TransformerConfig()))
    assert translation.has_attention_weights(RNNSeq2Seq(vocab_size=8, attention="bahdanau"))
    assert not translation.has_attention_weights(RNNSeq2Seq(vocab_size=8, attention="none"))
