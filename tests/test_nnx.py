"""The Linen modules from Flax NNX code, through `flax.nnx.bridge`: a model wrapped with
`ToNNX` holds the Linen model's parameters, computes the same logits, decodes with its cache,
and one NNX training step (nnx.Optimizer, nnx.value_and_grad, nnx.jit) gives the parameters a
Linen step gives."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from transformer.modules.models import build_model

VOCAB = 64


def lm_and_batch():
    model = build_model(
        dict(
            name="decoder_lm",
            vocab_size=VOCAB,
            d_model=32,
            num_heads=2,
            d_ff=64,
            num_layers=2,
            dropout_rate=0.0,
            pattern=[{"name": "sliding_window", "left": 4}, "full"],
        )
    )
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 1, VOCAB)
    return model, tokens, jnp.roll(tokens, -1, axis=1)


def loss(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def test_an_nnx_training_step_matches_the_linen_step_and_decoding_runs_through_the_bridge():
    model, tokens, targets = lm_and_batch()
    lm = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0)).lazy_init(tokens)
    params = nnx.to_pure_dict(nnx.state(lm, nnx.Param))  # the Linen parameter tree, as is
    assert set(params) == set(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    full = lm(tokens)
    np.testing.assert_array_equal(full, model.apply({"params": params}, tokens))
    # Cached decoding through the bridge: the methods are reached with method=.
    state = lm(tokens, 16, method="init_decode_state")
    logits = []
    for position in range(4):
        step_logits, state = lm(state, tokens[:, position], method="decode_step")
        logits.append(step_logits)
    np.testing.assert_allclose(jnp.stack(logits, 1), full[:, :4], rtol=2e-4, atol=2e-4)

    # Adam's eps well above float32 rounding: the key biases' gradients are zero in exact
    # arithmetic (a softmax ignores a constant added to a row), and with a tiny eps Adam turns
    # their rounding noise into full-size steps that differ with any order of summation.
    optimizer = optax.adamw(1e-2, eps=1e-3)
    nnx_optimizer = nnx.Optimizer(lm, optimizer, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(lm, nnx_optimizer):
        value, grads = nnx.value_and_grad(lambda m: loss(m(tokens, train=True), targets))(lm)
        nnx_optimizer.update(lm, grads)
        return value

    @jax.jit
    def linen_step(params, opt_state):
        value, grads = jax.value_and_grad(
            lambda p: loss(model.apply({"params": p}, tokens, train=True), targets)
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return value, optax.apply_updates(params, updates)

    nnx_loss = nnx_step(lm, nnx_optimizer)
    linen_loss, linen_params = linen_step(params, optimizer.init(params))
    np.testing.assert_allclose(nnx_loss, linen_loss, rtol=1e-6)
    trained = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), trained, params)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter took the step
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), trained, linen_params
    )
