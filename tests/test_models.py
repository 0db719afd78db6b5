"""Stacks and models: causality, padding, patterns per layer, configs, Transformer-base size."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from transformer import patterns
from transformer.models import (CONFIGS, MODELS, Decoder, Encoder, TransformerConfig,
                                build_model, layer_pattern, shift_right)

TINY = dict(vocab_size=23, d_model=16, num_heads=2, d_ff=32, num_layers=2, dropout_rate=0.1)


def tiny_config(**overrides):
    return TransformerConfig(**{**TINY, **overrides})


def random_tokens(seed, batch, length, vocab=TINY["vocab_size"]):
    return jax.random.randint(jax.random.key(seed), (batch, length), 1, vocab)


def jacobian_by_position(function, x):
    """|d out[0, i, :] / d x[0, j, :]| summed over features: `[length_out, length_in]`."""
    jacobian = jax.jit(jax.jacrev(function))(x)  # [1, L_out, D_out, 1, L_in, D_in]
    return np.abs(np.asarray(jacobian[0, :, :, 0])).sum(axis=(1, 3))


def test_decoder_output_i_has_zero_gradient_wrt_inputs_after_i():
    for norm_position, positional in (("post", "sinusoidal"), ("pre", "rotary")):
        config = tiny_config(norm_position=norm_position, positional=positional)
        decoder = Decoder(config, num_layers=2)
        x = jax.random.normal(jax.random.key(0), (1, 7, 16))
        encoded = jax.random.normal(jax.random.key(1), (1, 5, 16))
        variables = jax.jit(decoder.init)(jax.random.key(2), x, None, encoded)
        gradient = jacobian_by_position(lambda e: decoder.apply(variables, e, None, encoded), x)
        assert np.all(gradient[np.triu_indices(7, k=1)] == 0.0), (norm_position, positional)
        # The test could not pass by everything being zero: the past does flow.
        assert np.all(gradient[np.tril_indices(7)] > 0.0)


def test_language_model_logit_i_has_zero_gradient_wrt_embeddings_after_i():
    model = build_model(dict(name="decoder_lm", **TINY, positional="alibi"))
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
