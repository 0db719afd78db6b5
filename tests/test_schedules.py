"""Per-layer pattern schedules: a model's `pattern` as a sequence of entries, repeated to the
depth, each entry with its own options; layer i attends with entry i % len."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kv_cache import decode_all

from transformer import patterns
from transformer.modules.models import build_model, layer_pattern

SMALL = dict(vocab_size=29, d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0)
WINDOW_1 = {"name": "sliding_window", "left": 1}


def decoder(schedule, num_layers, **fields):
    return build_model(
        dict(name="decoder_lm", num_layers=num_layers, pattern=schedule, **SMALL, **fields)
    )


def test_layer_i_takes_entry_i_mod_length_with_its_own_options_and_seed():
    model = decoder(
        [WINDOW_1, "random", patterns.anchor(2)],
        5,
        pattern_options={"num_blocks": 1, "block_size": 4},
    )
    built = [layer_pattern(model.config, i, causal=False) for i in range(5)]
    assert built[0] == built[3] == patterns.sliding_window(1)
    assert built[2] == patterns.anchor(2)
    assert isinstance(built[1], patterns.RandomBlocks) and isinstance(
        built[4], patterns.RandomBlocks
    )
    assert built[1] != built[4]  # the random entry is redrawn per layer, as for a single name
    assert built[1] == patterns.build("random", layer=1, num_blocks=1, block_size=4)
    assert layer_pattern(model.config, 2, causal=True) == patterns.anchor(2) & patterns.causal()


def reach(model, length=12):
    """{p: whether the logits at the last position change when token p changes}."""
    tokens = jax.random.randint(jax.random.key(0), (1, length), 1, SMALL["vocab_size"])
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
    # Row p has token p changed; row `length` is the original.
    others = jnp.concatenate([jnp.tile(tokens, (length, 1)), tokens])
    others = others.at[jnp.arange(length), jnp.arange(length)].set(
        tokens[0] % (SMALL["vocab_size"] - 1) + 1
    )
    last = jax.jit(model.apply)(variables, others)[:, -1]
    return {p: not np.allclose(last[p], last[length]) for p in range(length)}


def test_the_model_attends_with_each_layers_entry():
    # Two window-1 layers reach 2 positions back; a full layer in the stack reaches all.
    windows = reach(decoder([WINDOW_1], 2))
    assert [p for p, c in windows.items() if c] == [9, 10, 11]
    assert all(reach(decoder([WINDOW_1, "full"], 2)).values())


def test_cached_decoding_of_a_schedule_equals_the_full_call():
    model = decoder(
        [{"name": "sliding_window", "left": 3}, "full", {"name": "anchor", "num_anchors": 2}],
        3,
        positional="rotary",
    )
    tokens = jax.random.randint(jax.random.key(2), (2, 20), 1, SMALL["vocab_size"])
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    full = jax.jit(model.apply)(variables, tokens)
    np.testing.assert_allclose(decode_all(model, variables, tokens, 20), full, atol=2e-4, rtol=2e-4)


def test_an_encoder_classifier_runs_a_schedule():
    model = build_model(
        dict(name="encoder_classifier", num_layers=2, pattern=[WINDOW_1, "full"], **SMALL)
    )
    tokens = jnp.ones((2, 9), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    assert jax.jit(model.apply)(variables, tokens).shape == (2, 2)


@pytest.mark.parametrize(
    "schedule,message",
    [
        ([], "needs at least one entry"),
        ([WINDOW_1, 3], "a pattern entry must be a name"),
        ([{"left": 2}], "a pattern entry must be a name"),
        ([{"name": "windows", "left": 2}], "unknown attention pattern 'windows'"),
        ([{"name": "full", "left": 2}], r"pattern 'full' takes no option\(s\) \['left'\]"),
        ([{"name": "sliding_window"}], r"needs option\(s\) \['left'\]"),
        ({"name": "full"}, "a dict of options is an entry of a schedule"),
    ],
)
def test_a_bad_schedule_is_refused_at_build_time_naming_the_entry(schedule, message):
    with pytest.raises(ValueError, match=message):
        decoder(schedule, 2)
