"""Exact match and token accuracy by source length (transformer/evaluation/exact_match.py) and
the bottleneck_length experiment's sweep."""

import math

import ml_collections
import pytest
from experiment_files import load_experiment

from transformer.evaluation import exact_match
from transformer.token_ids import EOS_ID, PAD_ID
from transformer.training import loop, sweep

# Reversals of sources of 2, 3, 5 and 9 symbols: (source, reference), each closed by EOS.
SOURCES = [[5, 6], [5, 6, 7], [4, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9, 10, 11, 12]]
EXAMPLES = [(s + [EOS_ID], s[::-1] + [EOS_ID]) for s in SOURCES]
REFERENCES = [reference for _, reference in EXAMPLES]
LENGTHS = [exact_match.source_length(source) for source, _ in EXAMPLES]


def score(hypotheses, edges=(3, 6), longest_trained=None):
    return exact_match.score(REFERENCES, hypotheses, LENGTHS, edges, longest_trained)


def test_source_length_leaves_out_the_closing_eos():
    assert LENGTHS == [2, 3, 5, 9]
    assert exact_match.source_length([5, 6]) == 2  # cut off before its EOS


def test_a_perfect_model_scores_1_everywhere():
    scores = score(REFERENCES, longest_trained=4)
    assert set(scores.values()) == {1.0}
    assert set(scores) == {
        f"{metric}{suffix}"
        for metric in exact_match.METRICS
        for suffix in ("", "_len_0_3", "_len_3_6", "_len_6_up", "_beyond_train")
    }


def test_a_wrong_model_scores_less_and_token_accuracy_counts_positions():
    hypotheses = [
        REFERENCES[0],  # right
        [7, 5, 6, 6],  # 1 of 4 tokens at its place, and no EOS (decoding ran out of length)
        [8, 7, 6, 5, EOS_ID],  # one symbol short: 4 of 6 right, then EOS too soon
        REFERENCES[3][:-1] + [13, EOS_ID],  # one symbol too many: all but the EOS right
    ]
    scores = score(hypotheses)
    assert scores["exact_match"] == pytest.approx(1 / 4)
    assert scores["token_accuracy"] == pytest.approx((3 + 1 + 4 + 9) / (3 + 4 + 6 + 10))
    assert scores["exact_match_len_0_3"] == 1.0  # length 2
    # Lengths 3 and 5: an edge opens the bucket above it.
    assert scores["exact_match_len_3_6"] == 0.0
    assert scores["token_accuracy_len_3_6"] == pytest.approx((1 + 4) / (4 + 6))
    assert scores["exact_match_len_6_up"] == 0.0
    assert scores["token_accuracy_len_6_up"] == pytest.approx(9 / 10)


def test_empty_buckets_are_left_out_and_beyond_training_is_over_longer_sources():
    scores = score(REFERENCES[:2] + [[2], [2]], edges=(3, 20, 30), longest_trained=4)
    assert "exact_match_len_20_30" not in scores and "exact_match_len_30_up" not in scores
    assert scores["exact_match_len_3_20"] == pytest.approx(1 / 3)
    # Lengths 5 and 9 are beyond 4, both wrong; nothing beyond 9.
    assert scores["exact_match_beyond_train"] == scores["token_accuracy_beyond_train"] == 0.0
    assert "exact_match_beyond_train" not in score(REFERENCES, longest_trained=9)
    assert "exact_match_beyond_train" not in score(REFERENCES)


def test_metric_names_cover_what_score_returns():
    settings = exact_match.resolve({"bucket_edges": (3, 6)})
    assert set(score(REFERENCES, longest_trained=4)) == set(exact_match.metric_names(settings))


def test_mismatched_or_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="4 references, 3 hypotheses and 4 source lengths"):
        score(REFERENCES[:3])
    with pytest.raises(ValueError, match="no sequences to score"):
        exact_match.score([], [], [], (3,))


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"edges": (4,)}, r"unknown exact_match_eval field\(s\) \['edges'\]; allowed: .*"),
        ({"strategy": "sample"}, r"exact_match_eval.strategy='sample'; allowed: \['greedy', "),
        ({"bucket_edges": (8, 8)}, r"exact_match_eval.bucket_edges must be ascending positive"),
        ({"num_examples": -1}, r"exact_match_eval.num_examples must be >= 0; got -1"),
    ],
)
def test_a_wrong_exact_match_eval_field_is_named(fields, message):
    with pytest.raises(ValueError, match=message):
        exact_match.resolve(fields)


def test_the_experiments_bad_values_are_named_at_start_up():
    get_config = load_experiment("bottleneck_length.py").get_config
    with pytest.raises(ValueError, match=r"unknown bottleneck_length variant 'rnn'; allowed: "):
        get_config("smoke,rnn")
    config = get_config("smoke,bahdanau")
    config.exact_match_eval.bucket_edges = (9, 4)
    with pytest.raises(ValueError, match=r"exact_match_eval.bucket_edges must be ascending"):
        loop.prepare(config)
    config = get_config("smoke,bahdanau")
    config.task = "classification"
    config.data = ml_collections.ConfigDict(dict(name="listops", config="tiny"))
    with pytest.raises(ValueError, match=r"config.exact_match_eval is read only by task"):
        loop.prepare(config)


def test_the_training_limit_counts_sources_without_their_eos():
    from transformer.training.tasks import longest_training_source

    config = load_experiment("bottleneck_length.py").get_config("cpu,luong")
    assert longest_training_source(config) == config.data.builder_overrides.max_length


def test_an_evaluation_set_shorter_than_training_is_an_error():
    module = load_experiment("bottleneck_length.py")
    preset = module.PRESETS["smoke"]
    module.PRESETS["smoke"] = {**preset, "eval_data": module.longer(5, size=8)}
    try:
        with pytest.raises(ValueError, match=r"max_length=5 is shorter than the training"):
            module.get_config("smoke")
    finally:
        module.PRESETS["smoke"] = preset


def test_smoke_preset_sweeps_end_to_end_with_exact_match_by_length(tmp_path):
    experiment = load_experiment("bottleneck_length.py").get_config
    variants = ("bahdanau",)  # attention weights to plot

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
        for metric in ("exact_match", "token_accuracy"):
            assert 0.0 <= results[f"eval_lengths/{metric}"] <= 1.0
            # The smoke evaluation set runs to 12 symbols, training to 8: both buckets beyond it
            # (9 and up) and the whole of it are reported.
            assert 0.0 <= results[f"eval_lengths/{metric}_len_9_up"] <= 1.0
            assert 0.0 <= results[f"eval_lengths/{metric}_beyond_train"] <= 1.0
        assert math.isfinite(results["eval_lengths/loss"])
    table = (tmp_path / "results.md").read_text()
    assert "| variant | runs | " + " | ".join(plan.metrics) + " |" in table
    assert (tmp_path / "plot.png").stat().st_size > 1000
    alignments = tmp_path / "runs" / "bahdanau" / "seed_0" / "alignments"
    assert [p for p in alignments.rglob("*.png")]


def test_token_names_name_the_reserved_ids():
    assert exact_match.token_names([PAD_ID, EOS_ID, 7]) == ["<pad>", "</s>", "7"]
