"""The ablation switches of the model config: each removes what it says, and nothing by default."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from test_kv_cache import decode_all

from transformer.attention import dot_product_attention
from transformer.modules import build_model
from transformer.modules.layers import EncoderLayer, LayerConfig
from transformer.modules.multihead_attention import MultiHeadAttention

LM = dict(name="decoder_lm", vocab_size=32, d_model=16, num_heads=2, d_ff=32, num_layers=2)
TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 2, 32)


def lm_model(**switches):
    return build_model({**LM, "dropout_rate": 0.0, "norm_position": "pre", **switches})


def lm(**switches):
    model = lm_model(**switches)
    return model, jax.jit(model.init)(jax.random.key(0), TOKENS)


def param_paths(**switches):
    """The parameter names of `lm(**switches)`, from their shapes alone (nothing compiled)."""
    variables = jax.eval_shape(lm_model(**switches).init, jax.random.key(0), TOKENS)
    return ["/".join(path) for path in traverse_util.flatten_dict(variables["params"])]


def test_no_feed_forward_has_no_feed_forward_parameters():
    assert any("feed_forward/" in p for p in param_paths())
    paths = param_paths(feed_forward=False)
    assert not any("feed_forward" in p for p in paths)
    assert any("self_attention/" in p for p in paths)


def test_norm_position_none_has_no_layer_norm_anywhere():
    assert any("norm" in p for p in param_paths())
    assert not any("norm" in p for p in param_paths(norm_position="none"))


def zero_sublayer_outputs(variables):
    """The same parameters with each sublayer's last projection zeroed: sublayers output 0."""
    flat = traverse_util.flatten_dict(variables["params"])
    for path in flat:
        if path[0] in ("self_attention", "feed_forward") and path[1] in ("out", "output"):
            flat[path] = jnp.zeros_like(flat[path])
    return {"params": traverse_util.unflatten_dict(flat)}


@pytest.mark.parametrize("norm_position", ["pre", "post", "none"])
def test_without_residual_the_layer_output_does_not_contain_the_input(norm_position):
    """With every sublayer's output zeroed, a layer with residuals passes x on (normalised when
    post-LN); one without them has nothing of x left."""
    x = jax.random.normal(jax.random.key(2), (2, 6, 16)) * 3.0 + 1.0
    outputs = {}
    for residual in (True, False):
        config = LayerConfig(
            d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0, norm_position=norm_position
        )
        config = LayerConfig(**{**config.__dict__, "residual": residual})
        layer = EncoderLayer(config)
        variables = zero_sublayer_outputs(jax.jit(layer.init)(jax.random.key(0), x))
        outputs[residual] = np.asarray(jax.jit(layer.apply)(variables, x))
    if norm_position == "post":  # LayerNorm(x + 0), twice; its bias starts at 0
        normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(outputs[True], normed, atol=1e-4)
    else:
        np.testing.assert_allclose(outputs[True], x, atol=1e-6)
    np.testing.assert_allclose(outputs[False], 0.0, atol=1e-6)


def test_unscaled_attention_is_scaled_attention_of_queries_times_sqrt_head_dim():
    head_dim = 64
    x = jax.random.normal(jax.random.key(3), (2, 10, 32))
    unscaled = MultiHeadAttention(num_heads=2, features=32, head_dim=head_dim, scale_scores=False)
    variables = jax.jit(unscaled.init)(jax.random.key(0), x)
    got = jax.jit(unscaled.apply)(variables, x)

    params = variables["params"]

    def project(name, inputs):
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        return jnp.einsum("bld,dhk->blhk", inputs, kernel) + bias

    q, k, v = (project(name, x) for name in ("query", "key", "value"))
    attended = dot_product_attention(q * head_dim**0.5, k, v)  # default scale 1/sqrt(head_dim)
    want = jnp.einsum("blhk,hkd->bld", attended, params["out"]["kernel"]) + params["out"]["bias"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    scaled = MultiHeadAttention(num_heads=2, features=32, head_dim=head_dim).apply(variables, x)
    assert float(jnp.abs(scaled - got).max()) > 1e-2  # the switch changes something


def test_unscaled_decoding_with_a_cache_equals_the_full_call():
    model, variables = lm(scale_scores=False, head_dim=64)
    full = jax.jit(model.apply)(variables, TOKENS)
    cached = decode_all(model, variables, TOKENS, max_decode_len=16)
    np.testing.assert_allclose(cached, full, atol=2e-4, rtol=2e-4)


def future_changes_the_present(model, variables, train):
    """Whether changing the last token changes the logits at the positions before it."""
    changed = TOKENS.at[:, -1].set((TOKENS[:, -1] + 1) % 30 + 2)
    apply = jax.jit(model.apply, static_argnames="train")
    before = apply(variables, TOKENS, train=train)[:, :-1]
    after = apply(variables, changed, train=train)[:, :-1]
    return float(jnp.abs(before - after).max()) > 1e-6


def test_causal_mask_in_training_false_sees_the_future_only_in_training():
    model, variables = lm()
    assert not future_changes_the_present(model, variables, train=True)
    assert not future_changes_the_present(model, variables, train=False)
    model, variables = lm(causal_mask_in_training=False)
    assert future_changes_the_present(model, variables, train=True)
    assert not future_changes_the_present(model, variables, train=False)


def test_the_defaults_are_the_full_model():
    config = LayerConfig()
    assert (config.residual, config.feed_forward, config.scale_scores) == (True, True, True)
    default, variables = lm()
    explicit = build_model(
        {
            **LM,
            "dropout_rate": 0.0,
            "norm_position": "pre",
            "residual": True,
            "feed_forward": True,
            "scale_scores": True,
            "causal_mask_in_training": True,
        }
    )
    np.testing.assert_array_equal(
        jax.jit(default.apply)(variables, TOKENS), jax.jit(explicit.apply)(variables, TOKENS)
    )


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(residual="no"), r"residual must be True or False; got 'no'"),
        (dict(feed_forward=0), r"feed_forward must be True or False; got 0"),
        (dict(scale_scores=None), r"scale_scores must be True or False; got None"),
        (dict(causal_mask_in_training=1), r"causal_mask_in_training must be True or False"),
        (
            dict(norm_position="sandwich"),
            r"unknown norm_position 'sandwich'; allowed: post, pre, none",
        ),
    ],
)
def test_bad_switch_values_name_the_field_and_the_allowed_values(fields, message):
    with pytest.raises(ValueError, match=message):
        build_model({**LM, **fields})


def test_an_encoder_refuses_the_decoders_causal_switch():
    fields = {**LM, "name": "encoder_classifier", "causal_mask_in_training": False}
    with pytest.raises(ValueError, match=r"has no field\(s\) \['causal_mask_in_training'\]"):
        build_model(fields)
