"""The ablations experiment: its variants change what they say, its smoke preset sweeps end to
end, and the gradient norms per layer measure what they claim."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from experiment_files import load_experiment

from transformer.training import grad_norms, sweep
from transformer.training.config_schema import differences

ablations = load_experiment("ablations.py")


def changes(variant, preset="cpu"):
    """{dotted field: new value} that a variant changes from the full model."""
    full = ablations.get_config(f"{preset},full").to_dict()
    other = ablations.get_config(f"{preset},{variant}").to_dict()
    return {field: new for field, _, new in differences(full, other)}


@pytest.mark.parametrize(
    "variant,expected",
    [
        ("full", {}),
        ("no_feed_forward", {"model.feed_forward": False}),
        ("no_residual", {"model.residual": False}),
        ("no_layer_norm", {"model.norm_position": "none"}),
        ("no_scale", {"model.scale_scores": False}),
        ("one_head", {"model.num_heads": 1, "model.head_dim": 128}),  # the same width
        ("no_causal_mask", {"model.causal_mask_in_training": False}),
    ],
)
def test_each_variant_changes_only_its_own_fields(variant, expected):
    assert changes(variant) == expected


def test_the_deep_variants_differ_in_norm_position_and_warmup_only():
    pre, post, post_warmup = (
        changes(v) for v in ("deep_pre_ln", "deep_post_ln", "deep_post_ln_warmup")
    )
    assert pre["model.num_layers"] == 12 and pre["optimizer.warmup_steps"] == 0
    assert post == {**pre, "model.norm_position": "post"}
    warmup = ablations.get_config("cpu,deep_post_ln_warmup").optimizer.warmup_steps
    assert warmup > 0
    assert post_warmup == {**post, "optimizer.warmup_steps": warmup}


def test_smoke_sweep_trains_with_and_without_the_causal_mask(tmp_path):
    def get_config(arg):
        config = ablations.get_config(arg)
        config.sweep.variants = ("full", "no_causal_mask")
        return config

    records = sweep.run_sweep(get_config, "smoke", str(tmp_path), {"data_dir": str(tmp_path)})
    assert [r["variant"] for r in records] == ["full", "no_causal_mask"]
    for record in records:
        for metric in get_config("smoke").sweep.metrics:
            assert math.isfinite(record["results"][metric]), metric
    assert "| no_causal_mask | 1 | " in (tmp_path / "results.md").read_text()
    ablations.plot_sweep(str(tmp_path / "runs.csv"), str(tmp_path / "bars.png"))
    assert (tmp_path / "bars.png").stat().st_size > 1000

    # Both models generate from their checkpoints, under the causal mask, to the context's end.
    samples = ablations.generate_samples(
        "smoke", str(tmp_path), prompt="KING:\n", num_samples=3, data_dir=str(tmp_path)
    )
    assert sorted(samples) == [("full", 0), ("no_causal_mask", 0)]
    assert all(
        len(texts) == 3 and all(isinstance(t, str) for t in texts) for texts in samples.values()
    )
    with pytest.raises(ValueError, match="fills the context"):
        ablations.generate_samples(
            "smoke", str(tmp_path), prompt="x" * get_config("smoke").data.max_length
        )


def test_word_rate_counts_the_words_found():
    words = {"the", "king"}
    assert ablations.word_rate("The king, the QUEEN.", words) == 0.75
    assert math.isnan(ablations.word_rate(" 12 ,;", words))


def test_doubled_letter_rate_counts_letters_followed_by_themselves():
    assert ablations.doubled_letter_rate("thee ok") == 1 / 5  # t-h, h-e, e-e, e-" ", o-k
    assert math.isnan(ablations.doubled_letter_rate("1 2"))


def test_per_layer_takes_the_norm_of_each_layers_parameters():
    grads = {
        "embed": {"embedding": jnp.full((3, 2), 100.0)},  # not a layer: left out
        "decoder": {
            "layers_0": {"a": {"kernel": jnp.array([3.0, 0.0])}, "b": jnp.array([4.0])},
            "layers_1": {"a": {"kernel": jnp.array([0.0, -2.0])}},
        },
    }
    np.testing.assert_allclose(grad_norms.per_layer(grads), [5.0, 2.0])
    with pytest.raises(ValueError, match="no parameters under 'layers_<i>'"):
        grad_norms.per_layer({"embed": jnp.ones(2)})


def test_layer_grad_norms_at_init_and_after_training(tmp_path):
    config = ablations.get_config("smoke,deep_pre_ln")
    config.data_dir = str(tmp_path)
    norms = grad_norms.layer_grad_norms(config, at_steps=(2, 0))
    assert sorted(norms) == [0, 2]
    for step in (0, 2):
        assert norms[step].shape == (config.model.num_layers,)
        assert np.all(np.isfinite(norms[step])) and np.all(norms[step] > 0)
    assert not np.allclose(norms[0], norms[2])  # the parameters moved
    grad_norms.plot({"pre-LN": norms}, str(tmp_path / "norms.png"))
    assert (tmp_path / "norms.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="at_steps must be steps >= 0"):
        grad_norms.layer_grad_norms(config, at_steps=())
