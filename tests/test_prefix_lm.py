"""Prefix LM in decoders: a prefix_lm(n) pattern keeps its bidirectional prefix in a DecoderLM
(alone or intersected with a sparse pattern), and decoding after a prefill of the whole prefix
equals the full call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kv_cache import decode_all, prefill, random_tokens

from transformer import patterns
from transformer.modules.models import DecoderLM, TransformerConfig, layer_pattern

PREFIX, LENGTH, VOCAB = 5, 13, 29
SPARSE = patterns.sliding_window(3) & patterns.prefix_lm(PREFIX)


def _reference_mask(length, prefix, window=None):
    """The dense float64 reference's rule: j <= i, or both in the prefix; within the window."""
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    allowed = (j <= i) | ((i < prefix) & (j < prefix))
    if window is not None:
        allowed &= np.abs(i - j) <= window
    return allowed


def _config(pattern, **fields):
    base = dict(
        vocab_size=VOCAB,
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_layers=1,
        max_len=32,
        dropout_rate=0.0,
        positional="rotary",
        pattern=pattern,
    )
    return TransformerConfig(**{**base, **fields})


@pytest.mark.parametrize(
    "pattern, window",
    [(patterns.prefix_lm(PREFIX), None), (SPARSE, 3), ({"name": "prefix_lm"}, None)],
)
def test_a_decoder_keeps_the_prefix_bidirectional(pattern, window):
    if isinstance(pattern, dict):  # by name: a schedule entry with its own options
        pattern = ({**pattern, "prefix_length": PREFIX},)
    config = _config(pattern)
    for layer in range(config.num_layers):
        mask = layer_pattern(config, layer, causal=True).mask(LENGTH, LENGTH)
        np.testing.assert_array_equal(mask, _reference_mask(LENGTH, PREFIX, window))


def test_a_causal_decoder_is_unchanged():
    config = _config(patterns.sliding_window(3))
    mask = layer_pattern(config, 0, causal=True).mask(LENGTH, LENGTH)
    np.testing.assert_array_equal(mask, _reference_mask(LENGTH, 0, 3))


def _float64_logits(model, variables, tokens):
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), variables)
        return np.asarray(model.apply(variables, tokens))


@pytest.mark.parametrize("pattern", [patterns.prefix_lm(PREFIX), SPARSE])
def test_prefix_lm_decoder_equals_the_float64_dense_reference(pattern):
    """Block-sparse float32 logits equal those of the dense implementation in float64, and a
    prefix position reads a later prefix token but no position reads a later one after it."""
    model = DecoderLM(_config(pattern, implementation="block_sparse"))
    reference = DecoderLM(_config(pattern, implementation="dense", dtype="float64"))
    tokens = random_tokens(0, 2, LENGTH, VOCAB)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    logits = np.asarray(jax.jit(model.apply)(variables, tokens))
    np.testing.assert_allclose(
        logits, _float64_logits(reference, variables, tokens), rtol=1e-4, atol=1e-4
    )
    # Position 2: inside the prefix and the window of position 0, after it.
    changed = tokens.at[:, 2].set(tokens[:, 2] % (VOCAB - 1) + 1)
    other = np.asarray(jax.jit(model.apply)(variables, changed))
    assert not np.allclose(other[:, 0], logits[:, 0])  # the prefix sees itself whole
    later = tokens.at[:, PREFIX + 2].set(tokens[:, PREFIX + 2] % (VOCAB - 1) + 1)
    other = np.asarray(jax.jit(model.apply)(variables, later))
    np.testing.assert_array_equal(other[:, : PREFIX + 2], logits[:, : PREFIX + 2])


@pytest.mark.parametrize("pattern", [patterns.prefix_lm(PREFIX), SPARSE])
def test_decoding_after_a_prefill_of_the_prefix_equals_the_full_call(pattern):
    model = DecoderLM(_config(pattern))
    max_len, lengths = 16, jnp.array([PREFIX, PREFIX + 3])
    sequences = random_tokens(1, 2, max_len, VOCAB)
    variables = jax.jit(model.init)(jax.random.key(0), sequences)
    prompt_len = int(lengths.max())
    prompt = jnp.where(
        jnp.arange(prompt_len)[None] < lengths[:, None], sequences[:, :prompt_len], 0
    )
    state = prefill(model, variables, prompt, max_len, lengths)
    steps = 6
    rest = jnp.stack([sequences[row, n : n + steps] for row, n in enumerate(lengths.tolist())])
    cached = decode_all(model, variables, rest, max_len, state=state)
    full = jax.jit(model.apply)(variables, sequences)
    for row, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(cached[row], full[row, n : n + steps], rtol=2e-4, atol=2e-4)


def test_prefix_lm_decoding_refuses_what_it_cannot_compute():
    model = DecoderLM(_config(patterns.prefix_lm(PREFIX)))
    tokens = random_tokens(2, 2, 8, VOCAB)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    with pytest.raises(
        ValueError, match="start from DecoderLM.prefill with a prompt of at least 5"
    ):
        model.apply(variables, tokens, 16, method="init_decode_state")
    with pytest.raises(ValueError, match="at least 5 tokens"):
        model.apply(variables, tokens, 16, lengths=jnp.array([4, 8]), method="prefill")
    config = _config(patterns.prefix_lm(3) & patterns.prefix_lm(4))
    with pytest.raises(ValueError, match="one prefix length"):
        layer_pattern(config, 0, causal=True)
