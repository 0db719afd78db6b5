"""Stacks and models: causality, padding, patterns per layer, configs, Transformer-base size."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from transformer import patterns, token_ids
from transformer.modules.models import (
    CONFIGS,
    Decoder,
    Encoder,
    EncoderDecoder,
    TransformerConfig,
    build_model,
    layer_pattern,
    shift_right,
)

# One layer where depth does not matter to the test: compile time is most of the test time.
TINY = dict(vocab_size=23, d_model=16, num_heads=2, d_ff=32, num_layers=1, dropout_rate=0.1)


def tiny_config(**overrides):
    return TransformerConfig(**{**TINY, **overrides})


def random_tokens(seed, batch, length, vocab=TINY["vocab_size"]):
    return jax.random.randint(jax.random.key(seed), (batch, length), 1, vocab)


def jacobian_by_position(function, x):
    """|d out[0, i, :] / d x[0, j, :]| summed over features: `[length_out, length_in]`."""
    jacobian = jax.jit(jax.jacrev(function))(x)  # [1, L_out, D_out, 1, L_in, D_in]
    return np.abs(np.asarray(jacobian[0, :, :, 0])).sum(axis=(1, 3))


def test_decoder_output_i_has_zero_gradient_wrt_inputs_after_i():
    # Two layers: a leak in layer 1 would reach every later position through layer 2.
    decoder = Decoder(tiny_config(norm_position="pre", positional="rotary"), num_layers=2)
    x = jax.random.normal(jax.random.key(0), (1, 7, 16))
    encoded = jax.random.normal(jax.random.key(1), (1, 5, 16))
    variables = jax.jit(decoder.init)(jax.random.key(2), x, None, encoded)
    gradient = jacobian_by_position(lambda e: decoder.apply(variables, e, None, encoded), x)
    assert np.all(gradient[np.triu_indices(7, k=1)] == 0.0)
    # The test could not pass by everything being zero: the past does flow.
    assert np.all(gradient[np.tril_indices(7)] > 0.0)


def test_language_model_logit_i_has_zero_gradient_wrt_embeddings_after_i():
    model = build_model(dict(name="decoder_lm", **{**TINY, "num_layers": 2}, positional="alibi"))
    tokens = random_tokens(0, 1, 9)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)

    def logits_from_embeddings(embeddings):
        # Replace the token lookup by `embeddings`, so the gradient reaches each position.
        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
                return embeddings
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return model.apply(variables, tokens)

    embeddings = jax.random.normal(jax.random.key(1), (1, 9, 16))
    gradient = jacobian_by_position(logits_from_embeddings, embeddings)
    assert np.all(gradient[np.triu_indices(9, k=1)] == 0.0)
    assert np.all(gradient[np.tril_indices(9)] > 0.0)


def test_encoder_outputs_at_real_positions_ignore_appended_padding():
    config = tiny_config(norm_position="pre", positional="alibi")
    encoder = Encoder(config)
    real = jax.random.normal(jax.random.key(0), (1, 5, 16))
    junk = 100.0 * jax.random.normal(jax.random.key(1), (1, 3, 16))  # whatever padding holds
    padded = jnp.concatenate([real, junk], axis=1)
    mask = jnp.arange(8)[None, :] < 5
    variables = jax.jit(encoder.init)(jax.random.key(2), padded, mask)
    apply = jax.jit(encoder.apply)
    np.testing.assert_allclose(
        apply(variables, padded, mask)[:, :5],
        apply(variables, real, jnp.ones((1, 5), bool)),
        rtol=1e-5,
        atol=1e-5,
    )


# Its tests run in one worker process, so the model compiles its init once.
LANGUAGE_MODEL_GROUP = pytest.mark.xdist_group("test_models language_model")


@pytest.fixture(scope="module")
def language_model():
    """A tiny DecoderLM with learned positions and attention dropout, and its variables."""
    model = build_model(
        dict(
            name="decoder_lm", **TINY, positional="learned", max_len=12, attention_dropout_rate=0.1
        )
    )
    return model, jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 12), jnp.int32))


@LANGUAGE_MODEL_GROUP
def test_language_model_logits_at_real_positions_ignore_appended_padding(language_model):
    model, variables = language_model
    tokens = random_tokens(0, 2, 6)
    padded = jnp.pad(tokens, ((0, 0), (0, 4)))
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(
        apply(variables, padded)[:, :6], apply(variables, tokens), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("pooling", ["cls", "mean", "attention"])
def test_classifier_logits_ignore_appended_padding(pooling):
    model = build_model(dict(name="encoder_classifier", **TINY, num_classes=3, pooling=pooling))
    tokens = random_tokens(0, 2, 5)
    padded = jnp.pad(tokens, ((0, 0), (0, 3)))
    variables = jax.jit(model.init)(jax.random.key(0), padded)
    if pooling == "attention":  # a non-zero query, so the weights are not uniform
        variables["params"]["AttentionPooling_0"]["query"] = jax.random.normal(
            jax.random.key(1), (16,)
        )
    apply = jax.jit(model.apply)
    logits = apply(variables, tokens)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    np.testing.assert_allclose(apply(variables, padded), logits, rtol=1e-5, atol=1e-5)
    # Padding that is not at the end is still padding: the pooled mean must not count it.
    assert not np.allclose(apply(variables, tokens.at[:, 1].set(1)), logits, atol=1e-4)


def test_shift_right_puts_the_start_token_first():
    np.testing.assert_array_equal(shift_right(jnp.array([[5, 6, 7, 0]])), [[1, 5, 6, 7]])


def test_models_and_data_agree_on_the_reserved_ids():
    from transformer.data import tokenizers
    from transformer.modules.rnn import RNNSeq2Seq

    assert (token_ids.PAD_ID, token_ids.BOS_ID, token_ids.EOS_ID, token_ids.CLS_ID) == (
        tokenizers.PAD_ID,
        tokenizers.BOS_ID,
        tokenizers.EOS_ID,
        tokenizers.CLS_ID,
    )
    assert EncoderDecoder.bos_id == RNNSeq2Seq.bos_id == tokenizers.BOS_ID


def test_encoder_decoder_is_causal_in_targets_and_ignores_source_padding():
    model = build_model(dict(name="encoder_decoder", **TINY, num_decoder_layers=1))
    source = random_tokens(0, 2, 6)
    targets = random_tokens(1, 2, 7)
    variables = jax.jit(model.init)(jax.random.key(0), source, targets)
    apply = jax.jit(model.apply)
    logits = apply(variables, source, targets)
    assert logits.shape == (2, 7, TINY["vocab_size"])
    # Position i predicts targets[i] from targets[:i]: changing targets[4:] leaves logits[:5].
    changed = targets.at[:, 4:].set(jax.random.randint(jax.random.key(2), (2, 3), 1, 23))
    changed_logits = apply(variables, source, changed)
    np.testing.assert_allclose(changed_logits[:, :5], logits[:, :5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(changed_logits[:, 5:], logits[:, 5:], atol=1e-4)
    # Padding the source changes nothing.
    padded_source = jnp.pad(source, ((0, 0), (0, 3)))
    np.testing.assert_allclose(
        apply(variables, padded_source, targets), logits, rtol=1e-5, atol=1e-5
    )


def test_encoder_decoder_with_separate_vocabularies():
    model = build_model(
        dict(
            name="encoder_decoder",
            **TINY,
            num_decoder_layers=1,
            target_vocab_size=11,
            share_embeddings=False,
            tie_output_embedding=False,
        )
    )
    source, targets = random_tokens(0, 2, 4), random_tokens(1, 2, 3, vocab=11)
    shapes = jax.eval_shape(model.init, jax.random.key(0), source, targets)["params"]
    assert shapes["source_embedding"]["embedding"].shape == (23, 16)
    assert shapes["target_embedding"]["embedding"].shape == (11, 16)
    assert shapes["output_projection"]["kernel"].shape == (16, 11)


@LANGUAGE_MODEL_GROUP
def test_dropout_follows_train_and_rng(language_model):
    model, variables = language_model
    tokens = random_tokens(0, 2, 6)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_logits = apply(variables, tokens, train=False)
    first = apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    again = apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(1)})
    other = apply(variables, tokens, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(again, first)
    assert not np.allclose(first, eval_logits, atol=1e-3)
    assert not np.allclose(other, first, atol=1e-3)


@LANGUAGE_MODEL_GROUP
def test_bfloat16_compute_keeps_float32_params_and_logits(language_model):
    model, variables = language_model
    tokens = random_tokens(0, 2, 6)
    bfloat16_model = model.clone(config=dataclasses.replace(model.config, dtype="bfloat16"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    logits = jax.jit(bfloat16_model.apply)(variables, tokens)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, jax.jit(model.apply)(variables, tokens), atol=0.1)


def test_each_layer_gets_its_own_pattern_and_decoders_add_causal():
    config = tiny_config(pattern="random", pattern_options=dict(num_blocks=1, block_size=2))
    masks = [layer_pattern(config, layer, causal=False).mask(16, 16) for layer in range(3)]
    assert not np.array_equal(masks[0], masks[1]) or not np.array_equal(masks[1], masks[2])
    causal = layer_pattern(config, 0, causal=True).mask(16, 16)
    np.testing.assert_array_equal(causal, masks[0] & np.tri(16, dtype=bool))


def test_a_pattern_object_is_used_as_given_in_every_layer():
    pattern = patterns.sliding_window(2) | patterns.anchor(1)
    config = tiny_config(pattern=pattern)
    assert layer_pattern(config, 0, causal=False) == layer_pattern(config, 5, causal=False)
    assert layer_pattern(config, 3, causal=False) == pattern
    assert layer_pattern(config, 3, causal=True) == pattern & patterns.causal()
    assert layer_pattern(tiny_config(), 0, causal=True) == patterns.causal()


def test_encoder_attends_only_where_its_pattern_allows():
    config = tiny_config(pattern="sliding_window", pattern_options={"left": 1})
    encoder = Encoder(config)
    x = jax.random.normal(jax.random.key(0), (1, 6, 16))
    variables = jax.jit(encoder.init)(jax.random.key(1), x)
    gradient = jacobian_by_position(lambda e: encoder.apply(variables, e), x)
    allowed = patterns.sliding_window(1).mask(6, 6)  # one layer: the receptive field is the window
    assert np.all(gradient[~allowed] == 0.0) and np.all(gradient[allowed] > 0.0)


def test_build_model_accepts_config_dict_with_list_options():
    config = ml_collections.ConfigDict(
        dict(
            name="encoder_classifier",
            **TINY,
            num_classes=4,
            pattern="anchor",
            pattern_options=dict(positions=[0, 3]),
        )
    )
    model = build_model(config)
    assert model.config.num_classes == 4
    assert layer_pattern(model.config, 0, causal=False) == patterns.anchor(positions=[0, 3])
    hash(model)  # jax.jit(model.apply) hashes the module: the list must not break that


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(name="gpt"), "unknown model name 'gpt'; allowed: encoder_classifier"),
        (dict(name="decoder_lm", num_layer=2), "has no field(s) ['num_layer']"),
        (dict(name="decoder_lm", num_classes=2), "has no field(s) ['num_classes']"),
        (dict(name="decoder_lm", positional="absolute"), "unknown positional encoding 'absolute'"),
        (dict(name="encoder_classifier", pooling="max"), "unknown pooling 'max'; allowed: cls"),
        (dict(name="decoder_lm", norm_position="middle"), "unknown norm_position 'middle'"),
        (dict(name="decoder_lm", activation="tanh"), "unknown activation 'tanh'"),
        (dict(name="decoder_lm", pattern="dilated"), "unknown attention pattern 'dilated'"),
        (
            dict(name="decoder_lm", pattern="sliding_window", pattern_options=dict(width=3)),
            "takes no option(s) ['width']",
        ),
        (dict(name="decoder_lm", d_model=30, num_heads=4), "d_model 30 is not divisible"),
        (dict(name="decoder_lm", dropout_rate=1.5), "dropout_rate must be a number in [0, 1)"),
        (dict(name="decoder_lm", vocab_size=0), "vocab_size must be a positive integer"),
        (dict(name="encoder_decoder", target_vocab_size=9), "share_embeddings needs one vocab"),
    ],
)
def test_build_model_rejects_bad_configs_by_name(fields, message):
    with pytest.raises(ValueError) as error:
        build_model(fields)
    assert message in str(error.value)


def expected_transformer_base_parameters(vocab=37_000, d=512, d_ff=2048, layers=6):
    """Counted by hand from the architecture: weights and biases of every matrix, LayerNorm
    scales and offsets, one embedding shared by source, target and output projection."""
    attention = 4 * (d * d + d)  # W^Q, W^K, W^V, W^O with biases
    feed_forward = d * d_ff + d_ff + d_ff * d + d
    layer_norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * layer_norm
    decoder_layer = 2 * attention + feed_forward + 3 * layer_norm
    return vocab * d + layers * (encoder_layer + decoder_layer)


def test_transformer_base_parameter_count():
    model = build_model(CONFIGS["transformer_base"])
    tokens = jnp.ones((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)
    count = sum(leaf.size for leaf in jax.tree.leaves(shapes))
    assert count == expected_transformer_base_parameters() == 63_082_496
    # The paper reports about 65M (Table 3); docs/models.md explains the 3% difference.
    assert abs(count - 65e6) / 65e6 < 0.05


def decode_all(model, variables, inputs, tokens, max_decode_len):
    """Logits of `decode_step` fed `tokens` `[batch, length]` one by one: `[batch, length, V]`."""

    def run(variables, inputs, tokens):
        state = model.apply(variables, inputs, max_decode_len, method="init_decode_state")

        def step(state, token):
            logits, state = model.apply(variables, state, token, method="decode_step")
            return state, logits

        _, logits = jax.lax.scan(step, state, tokens.T)
        return jnp.swapaxes(logits, 0, 1)

    return jax.jit(run)(variables, inputs, tokens)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(positional="alibi", pattern="sliding_window", pattern_options={"left": 2}),
        dict(positional="rotary", norm_position="pre", tie_output_embedding=False),
    ],
)
def test_language_model_cached_decoding_equals_the_full_call(overrides):
    model = build_model(dict(name="decoder_lm", **{**TINY, "num_layers": 2}, **overrides))
    tokens = random_tokens(0, 2, 7)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    full = jax.jit(model.apply)(variables, tokens)
    cached = decode_all(model, variables, tokens, tokens, max_decode_len=9)
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(positional="learned", max_len=8, norm_position="pre"),
        # The decoder's self-attention is sliding_window & causal: 2 keys back, then the query.
        dict(positional="rotary", pattern="sliding_window", pattern_options={"left": 2}),
    ],
)
def test_encoder_decoder_cached_decoding_equals_the_full_call(overrides):
    model = build_model(dict(name="encoder_decoder", **TINY, num_decoder_layers=2, **overrides))
    source = jnp.pad(random_tokens(0, 2, 5), ((0, 0), (0, 2)))  # padded source
    targets = random_tokens(1, 2, 6)
    variables = jax.jit(model.init)(jax.random.key(0), source, targets)
    full = jax.jit(model.apply)(variables, source, targets)
    # Step i feeds decoder input i (BOS first) and returns the full call's logits at i.
    cached = decode_all(model, variables, source, shift_right(targets), max_decode_len=8)
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)
    if overrides["positional"] == "learned":
        with pytest.raises(ValueError, match="max_decode_len 9 exceeds the learned positional"):
            model.apply(variables, source, 9, method="init_decode_state")


@pytest.mark.parametrize(
    "name, implementation, fields",
    [
        (
            "encoder_classifier",
            "block_sparse",
            dict(
                positional="alibi",
                pattern="bigbird",
                pattern_options=dict(block_size=4, num_random_blocks=1, num_anchor_blocks=1),
            ),
        ),
        ("decoder_lm", "chunked", dict(positional="rotary")),  # full & causal() is plain causal()
    ],
)
def test_models_with_other_attention_implementations_match_dense(name, implementation, fields):
    tokens = jnp.pad(random_tokens(0, 2, 70), ((0, 0), (0, 5)))
    models = {
        impl: build_model(dict(name=name, **TINY, implementation=impl, **fields))
        for impl in ("dense", implementation)
    }
    variables = jax.jit(models["dense"].init)(jax.random.key(0), tokens)
    dense, other = (
        jax.jit(models[impl].apply)(variables, tokens) for impl in ("dense", implementation)
    )
    np.testing.assert_allclose(other, dense, rtol=1e-4, atol=1e-4)


def test_generate_with_the_cache_picks_the_full_calls_argmax_at_every_step():
    """The start token of decoding (bos_id) is the one the full call shifts in, and generate
    sizes the cache to the tokens it produces (default config.max_len)."""
    from transformer import decoding

    model = build_model(
        dict(name="encoder_decoder", **TINY, num_decoder_layers=2, positional="learned", max_len=7)
    )
    source = jnp.pad(random_tokens(0, 2, 5), ((0, 0), (0, 2)))
    variables = jax.jit(model.init)(jax.random.key(0), source, source)
    generated = decoding.generate(model, variables, source, eos_id=None)
    assert generated.shape == (2, 7)
    full = jax.jit(model.apply)(variables, source, generated)  # position i predicts generated[:, i]
    np.testing.assert_array_equal(jnp.argmax(full.at[..., 0].set(-jnp.inf), axis=-1), generated)
    with pytest.raises(ValueError, match="max_decode_len 8 exceeds the learned positional"):
        decoding.generate(model, variables, source, eos_id=None, max_len=8)
