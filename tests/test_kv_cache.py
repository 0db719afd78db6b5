"""Decoding caches that follow visibility (`transformer/modules/kv_cache.py`): each layout gives
the full call's logits at every step, holds what it promises, and builds no max_len^2 mask."""

import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import decoding, patterns
from transformer.attention.block_sparse import cpu_kernel
from transformer.modules import kv_cache
from transformer.modules.models import build_model, layer_pattern, shift_right

# head_dim 8: the XLA layouts; head_dim 16: full attention takes the CPU kernel. One layer where a
# case checks a layout; two where the second layer's cache matters: built from the first layer's
# outputs by prefill, or drawing random blocks of its own (test_models.py and test_schedules.py
# decode several layers from an empty cache).
SMALL = dict(vocab_size=29, d_model=16, num_heads=2, d_ff=32, num_layers=1, dropout_rate=0.0)
KERNEL_SIZED = {**SMALL, "d_model": 32}


def random_tokens(seed, batch, length, vocab=SMALL["vocab_size"]):
    return jax.random.randint(jax.random.key(seed), (batch, length), 1, vocab)


def decode_all(model, variables, tokens, max_decode_len, state=None):
    """Logits `[batch, length, vocab]` of `decode_step` fed `tokens` one by one from `state`
    (default: an empty cache)."""

    def run(variables, tokens, state):
        if state is None:
            state = model.apply(variables, tokens, max_decode_len, method="init_decode_state")

        def step(state, token):
            logits, state = model.apply(variables, state, token, method="decode_step")
            return state, logits

        return jnp.swapaxes(jax.lax.scan(step, state, tokens.T)[1], 0, 1)

    return jax.jit(run)(variables, tokens, state)


def prefill(model, variables, prompt, max_decode_len, lengths):
    """The decoding state after right-padded `prompt` `[batch, prompt_len]` of `lengths`
    `[batch]` real tokens, from one jitted forward pass (`method="prefill"`)."""
    return jax.jit(lambda v, p, n: model.apply(v, p, max_decode_len, lengths=n, method="prefill"))(
        variables, prompt, lengths
    )


# (fields, the layout the first layer's cache takes, sequence length). The lengths pass the
# first prefix segment (128) and wrap each ring several times.
CASES = {
    "full, kernel": (dict(KERNEL_SIZED, positional="rotary"), "prefix kernel", 140),
    "full, alibi, kernel": (dict(KERNEL_SIZED, positional="alibi"), "prefix kernel", 40),
    "window, ring kernel": (
        dict(
            KERNEL_SIZED, positional="alibi", pattern="sliding_window", pattern_options={"left": 4}
        ),
        "ring kernel",
        30,
    ),
    "full, segments": (dict(SMALL, positional="rotary"), "prefix", 140),
    "full, alibi, segments": (dict(SMALL, positional="alibi"), "prefix", 140),
    "window, anchors, ring": (
        dict(
            KERNEL_SIZED,
            positional="rotary",
            pattern="bigbird",
            pattern_options=dict(block_size=2, window_blocks=3, num_random_blocks=0),
        ),
        "ring",
        30,
    ),
    "window, ring": (
        dict(SMALL, positional="rotary", pattern="sliding_window", pattern_options={"left": 3}),
        "ring",
        30,
    ),
    "window, alibi, ring": (
        dict(SMALL, positional="alibi", pattern="sliding_window", pattern_options={"left": 5}),
        "ring",
        30,
    ),
    "bigbird, sparse": (
        dict(
            SMALL,
            num_layers=2,
            positional="rotary",
            pattern="bigbird",
            pattern_options=dict(block_size=4, num_anchor_blocks=1, num_random_blocks=2),
        ),
        "sparse",
        40,
    ),
    "anchors only, prefix with the pattern's row rule": (
        dict(SMALL, positional="sinusoidal", pattern="anchor", pattern_options={"num_anchors": 3}),
        "prefix",
        20,
    ),
    "random only, prefix with the pattern's row rule": (
        dict(
            SMALL,
            positional="learned",
            max_len=24,
            pattern="random",
            pattern_options=dict(num_blocks=2, block_size=4),
        ),
        "prefix",
        24,
    ),
}


def skip_without_kernel(kind):
    if kind.endswith("kernel") and cpu_kernel.unavailable() is not None:
        pytest.skip(f"needs the CPU kernel: {cpu_kernel.unavailable()}")


def assert_cached_decoding_equals_the_full_call(model, variables, tokens, fields, kind):
    """The first layer's cache takes the layout `kind` ("prefix kernel", "ring", ...), and
    decoding `tokens` one by one gives the full call's logits, which it returns."""
    head_dim = fields["d_model"] // fields["num_heads"]
    plan = kv_cache.plan(layer_pattern(model.config, 0, causal=True), jnp.float32, head_dim)
    assert plan.kind + " kernel" * plan.kernel == kind
    full = jax.jit(model.apply)(variables, tokens)
    cached = decode_all(model, variables, tokens, max_decode_len=tokens.shape[1])
    np.testing.assert_allclose(cached, full, rtol=2e-4, atol=2e-4)
    return full


@pytest.mark.parametrize("case", list(CASES))
def test_cached_decoding_equals_the_full_call(case):
    fields, kind, length = CASES[case]
    skip_without_kernel(kind)
    model = build_model(dict(name="decoder_lm", **fields))
    tokens = random_tokens(0, 2, length)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    assert_cached_decoding_equals_the_full_call(model, variables, tokens, fields, kind)


def test_a_window_layer_holds_its_window_only():
    fields = dict(SMALL, positional="rotary", pattern="sliding_window", pattern_options={"left": 3})
    model = build_model(dict(name="decoder_lm", **fields))
    tokens = random_tokens(1, 1, 4)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    shapes = {
        max_len: jax.eval_shape(
            lambda v, n=max_len: model.apply(v, tokens, n, method="init_decode_state"), variables
        )
        for max_len in (2, 64, 65_536)
    }
    leaves = {n: [leaf.shape for leaf in jax.tree.leaves(s)] for n, s in shapes.items()}
    assert leaves[64] == leaves[65_536]
    assert shapes[64]["cache"][0]["self"]["key"].shape == (1, 2, 4, 8)  # [batch, heads, w + 1, d]
    # A cache of fewer positions than the window holds only those.
    assert shapes[2]["cache"][0]["self"]["key"].shape == (1, 2, 2, 8)


def test_prefill_refuses_lengths_outside_the_prompt():
    model = build_model(dict(name="decoder_lm", **SMALL))
    prompt = random_tokens(1, 2, 5)
    variables = jax.jit(model.init)(jax.random.key(0), prompt)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, prompt_len=5\]; got \[6, 2\]"):
        model.apply(variables, prompt, 16, lengths=jnp.array([6, 2]), method="prefill")
    with pytest.raises(ValueError, match="does not fit a cache of 4"):
        model.apply(variables, prompt, 4, method="prefill")


def compiled_step(model, variables, max_len, batch=1):
    """The jitted decode step of `model` for a cache of max_len, lowered and compiled."""
    tokens = jnp.ones((batch, 1), jnp.int32)
    state = jax.eval_shape(
        lambda v: model.apply(v, tokens, max_len, method="init_decode_state"), variables
    )
    step = jax.jit(lambda v, s, t: model.apply(v, s, t, method="decode_step"))
    return step.lower(variables, state, tokens[:, 0])


def test_a_window_models_step_memory_does_not_grow_with_max_len():
    """XLA's buffer analysis of the compiled step: the same bytes for a cache of 256 positions
    and one of 65,536, since the ring holds the window only."""
    fields = dict(SMALL, positional="rotary", pattern="sliding_window", pattern_options={"left": 7})
    model = build_model(dict(name="decoder_lm", **fields))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    analyses = [
        compiled_step(model, variables, n).compile().memory_analysis() for n in (256, 65_536)
    ]
    sizes = [(a.argument_size_in_bytes, a.temp_size_in_bytes) for a in analyses]
    assert sizes[0] == sizes[1]
    # and a full-attention model's grows with it (the check can fail)
    full = build_model(dict(name="decoder_lm", **SMALL))
    grown = [
        compiled_step(full, variables, n).compile().memory_analysis().argument_size_in_bytes
        for n in (256, 4096)
    ]
    assert grown[1] > 8 * grown[0] // 2


def largest_constant(hlo_text):
    """The element count of the largest array constant in StableHLO text."""
    largest = 0
    for line in hlo_text.splitlines():
        if "stablehlo.constant" not in line:
            continue
        shape = re.search(r"tensor<([0-9x]*?)x?[a-z]+[0-9]*>\s*$", line.strip())
        if shape and shape.group(1):
            largest = max(largest, int(np.prod([int(n) for n in shape.group(1).split("x")])))
    return largest


@pytest.mark.parametrize(
    "fields",
    [
        dict(SMALL),
        dict(KERNEL_SIZED),
        dict(SMALL, pattern="sliding_window", pattern_options={"left": 16}),
        dict(SMALL, pattern="bigbird", pattern_options=dict(block_size=16)),
        dict(SMALL, pattern="anchor", pattern_options={"num_anchors": 4}),
    ],
    ids=["segments", "kernel", "ring", "sparse", "row rule"],
)
def test_no_step_builds_a_max_len_squared_constant(fields):
    max_len = 1024
    model = build_model(dict(name="decoder_lm", **fields))
    head_dim = fields["d_model"] // fields["num_heads"]
    plan = kv_cache.plan(layer_pattern(model.config, 0, causal=True), jnp.float32, head_dim)
    # The kernel case is the kernel's, wherever it is built.
    assert plan.kernel == (head_dim == 16 and cpu_kernel.unavailable() is None)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    text = compiled_step(model, variables, max_len).as_text()
    assert largest_constant(text) < max_len * 16
    # The check sees a max_len^2 mask where one is built.
    mask = jnp.asarray(patterns.sliding_window(3).mask(max_len, max_len))
    assert largest_constant(jax.jit(lambda x: x & mask).lower(mask).as_text()) == max_len**2


PREFILL_CASES = {
    "kernel": (dict(KERNEL_SIZED, positional="rotary"), 16, [7, 3, 1]),
    "segments": (dict(SMALL, positional="alibi"), 16, [7, 3, 1]),
    # Rows on both sides of the first segment's end (128), one crossing it while decoding.
    "segments, past 128": (dict(SMALL, num_layers=2, positional="rotary"), 144, [131, 124, 3]),
    "ring": (
        dict(SMALL, positional="rotary", pattern="sliding_window", pattern_options={"left": 2}),
        16,
        [7, 3, 1],
    ),
    "ring kernel": (
        dict(
            KERNEL_SIZED,
            num_layers=2,
            positional="alibi",
            pattern="sliding_window",
            pattern_options={"left": 2},
        ),
        16,
        [7, 3, 1],
    ),
    "ring with anchors": (
        dict(
            SMALL,
            positional="rotary",
            pattern="bigbird",
            pattern_options=dict(block_size=2, window_blocks=3, num_random_blocks=0),
        ),
        16,
        [7, 3, 1],
    ),
    "sparse": (
        dict(
            SMALL,
            num_layers=2,
            positional="sinusoidal",
            pattern="bigbird",
            pattern_options=dict(block_size=2, num_anchor_blocks=1, num_random_blocks=1),
        ),
        16,
        [7, 3, 1],
    ),
}


@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_hands_over_rows_of_different_lengths(case):
    """A right-padded batch of prompts of different lengths, prefilled in one forward pass, then
    fed the rest of each row one token at a time: every step's logits equal the full call's on
    that row."""
    fields, max_len, lengths = PREFILL_CASES[case]
    model = build_model(dict(name="decoder_lm", **fields))
    lengths = jnp.array(lengths)
    prompt_len = int(lengths.max())
    sequences = random_tokens(2, 3, max_len)
    variables = jax.jit(model.init)(jax.random.key(0), sequences)
    real = jnp.arange(prompt_len)[None, :] < lengths[:, None]
    prompt = jnp.where(real, sequences[:, :prompt_len], 0)
    state = prefill(model, variables, prompt, max_len, lengths)
    np.testing.assert_array_equal(state["positions"], lengths)
    steps = 8
    rest = jnp.stack([sequences[row, n : n + steps] for row, n in enumerate(lengths.tolist())])
    cached = decode_all(model, variables, rest, max_len, state=state)
    # The full call over max_len tokens: random blocks are drawn for the cache's length.
    full = jax.jit(model.apply)(variables, sequences)
    for row, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(cached[row], full[row, n : n + steps], rtol=2e-4, atol=2e-4)


def test_beam_search_over_a_ring_cache_keeps_each_beams_window():
    """Beam search reorders the cache's rows at every step: each of four beams' scores is its
    sequence's log-probability under the full call, which holds only if every beam kept its own
    window."""
    fields = dict(SMALL, positional="rotary", pattern="sliding_window", pattern_options={"left": 2})
    model = build_model(dict(name="encoder_decoder", num_decoder_layers=2, max_len=12, **fields))
    source = random_tokens(3, 2, 6)
    variables = jax.jit(model.init)(jax.random.key(0), source, source)
    tokens, scores = jax.jit(
        lambda v, s: decoding.beam_search(
            lambda state, token: model.apply(v, state, token, method="decode_step"),
            model.apply(v, s, 12, method="init_decode_state"),
            jnp.full((2,), model.bos_id, jnp.int32),
            beam_size=4,
            max_len=12,
            eos_id=2,
            alpha=0.0,
        )
    )(variables, source)

    # Every beam of both examples, scored by the full call: log p up to and with the first EOS.
    targets = tokens.reshape(8, 12)
    logits = jax.jit(model.apply)(variables, jnp.repeat(source, 4, axis=0), targets)
    logp = jax.nn.log_softmax(logits.at[..., 0].set(-jnp.inf))
    picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    after_eos = jnp.cumsum(targets == 2, axis=1) - (targets == 2) > 0
    expected = jnp.sum(jnp.where(after_eos, 0.0, picked), axis=1).reshape(2, 4)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


def kernel_reference(q, k_cache, v_cache, positions, alibi, ring, cap=None, sinks=None):
    """softmax(cap(q k^T / sqrt(d)) - alibi, with sinks) v in float64 over the keys each row
    sees: keys 0..p, or a ring's slots holding positions p - ((p - s) % slots) >= 0.
    `[batch, heads, dv]`."""
    q, k_cache, v_cache = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache))
    batch, _, slots, d = k_cache.shape
    out = np.zeros(q.shape[:2] + v_cache.shape[-1:])
    for b in range(batch):
        p = int(positions[b])
        if ring:
            held = p - (p - np.arange(slots)) % slots
            slot_index, at = np.flatnonzero(held >= 0), held[held >= 0]
        else:
            slot_index = at = np.arange(min(p + 1, slots))
        logits = np.einsum("hd,hkd->hk", q[b], k_cache[b][:, slot_index]) / np.sqrt(d)
        if cap is not None:
            logits = cap * np.tanh(logits / cap)
        if alibi is not None:
            logits = logits - np.asarray(alibi, np.float64)[:, None] * (p - at)
        with np.errstate(invalid="ignore", over="ignore"):
            shift = logits.max(-1, keepdims=True)
            if sinks is not None:
                sink = np.asarray(sinks, np.float64)[:, None]
                shift = np.maximum(shift, sink)
            weights = np.exp(logits - shift)
            total = weights.sum(-1, keepdims=True)
            if sinks is not None:
                total = total + np.exp(sink - shift)
            weights = weights / total
        out[b] = np.einsum("hk,hkd->hd", weights, v_cache[b][:, slot_index])
    return out


@pytest.mark.parametrize("ring", [False, True], ids=["prefix", "ring"])
def test_the_kernel_step_matches_the_dense_float64_reference_with_non_finite_values(ring):
    """One step of the CPU kernel against softmax(q k^T) v in float64: a NaN key that only some
    rows see, an inf value, a NaN query, a NaN new key at position 0, and (prefix) a row past
    max_len; with and without ALiBi."""
    if cpu_kernel.unavailable() is not None:
        pytest.skip(f"needs the CPU kernel: {cpu_kernel.unavailable()}")
    batch, heads, slots, d = 6, 2, 40, 16
    keys = jax.random.split(jax.random.key(5), 5)
    q, k_new, v_new = (jax.random.normal(k, (batch, heads, d)) for k in keys[:3])
    k_cache = jax.random.normal(keys[3], (batch, heads, slots, d))
    v_cache = jax.random.normal(keys[4], (batch, heads, slots, d))
    k_cache = k_cache.at[1, :, 20].set(jnp.nan)  # row 1 at position 25 sees it
    k_cache = k_cache.at[2, :, 30].set(jnp.nan)  # row 2 at position 10 does not (prefix)
    v_cache = v_cache.at[3, 0, 39].set(jnp.inf)  # row 3 sees it
    q = q.at[4].set(jnp.nan)  # row 4: a NaN query
    k_new = k_new.at[5].set(jnp.nan)  # row 5 at position 0: its only key is NaN
    positions = jnp.array([0, 25, 10, 45 if not ring else 39, 7, 0], jnp.int32)
    rows = jnp.arange(batch)
    slot = positions % slots if ring else jnp.where(positions < slots, positions, slots)
    expected_k = k_cache.at[rows, :, slot].set(k_new, mode="drop")
    expected_v = v_cache.at[rows, :, slot].set(v_new, mode="drop")
    for alibi in (None, jnp.array([0.5, 0.25])):
        out, k_after, v_after = jax.jit(functools.partial(cpu_kernel.decode_step, ring=ring))(
            q, k_new, v_new, k_cache, v_cache, positions, alibi
        )
        np.testing.assert_array_equal(k_after, expected_k)
        np.testing.assert_array_equal(v_after, expected_v)
        reference = kernel_reference(q, expected_k, expected_v, positions, alibi, ring)
        np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert np.isnan(out[1]).all() and np.isnan(out[4]).all() and np.isnan(out[5]).all()
        assert np.isfinite(out[0]).all()


@pytest.mark.parametrize("ring", [False, True], ids=["prefix", "ring"])
def test_the_kernel_step_with_soft_cap_and_sinks_matches_the_float64_reference(ring):
    """One step of the CPU kernel with a soft cap (before ALiBi) and sinks, against float64;
    with a row at position 0 (one key) and, for the prefix, one past max_len."""
    if cpu_kernel.unavailable() is not None:
        pytest.skip(f"needs the CPU kernel: {cpu_kernel.unavailable()}")
    batch, heads, slots, d = 4, 2, 40, 16
    keys = jax.random.split(jax.random.key(8), 5)
    q, k_new, v_new = (2 * jax.random.normal(k, (batch, heads, d)) for k in keys[:3])
    k_cache = 2 * jax.random.normal(keys[3], (batch, heads, slots, d))
    v_cache = jax.random.normal(keys[4], (batch, heads, slots, d))
    positions = jnp.array([0, 25, 45 if not ring else 39, 7], jnp.int32)
    rows = jnp.arange(batch)
    slot = positions % slots if ring else jnp.where(positions < slots, positions, slots)
    expected_k = k_cache.at[rows, :, slot].set(k_new, mode="drop")
    expected_v = v_cache.at[rows, :, slot].set(v_new, mode="drop")
    sinks = jnp.array([0.5, 3.0])
    for alibi in (None, jnp.array([0.5, 0.25])):
        for cap, with_sinks in ((1.5, True), (None, True), (1.5, False)):
            step = functools.partial(
                cpu_kernel.decode_step,
                ring=ring,
                logit_soft_cap=cap,
                sinks=sinks if with_sinks else None,
            )
            out, _, _ = jax.jit(step)(q, k_new, v_new, k_cache, v_cache, positions, alibi)
            reference = kernel_reference(
                q,
                expected_k,
                expected_v,
                positions,
                alibi,
                ring,
                cap,
                sinks if with_sinks else None,
            )
            np.testing.assert_allclose(out, reference, rtol=2e-5, atol=2e-5)
    # The sinks change the output: the test above could not pass with them ignored.
    plain = kernel_reference(q, expected_k, expected_v, positions, None, ring, 1.5)
    assert (
        np.abs(
            plain - kernel_reference(q, expected_k, expected_v, positions, None, ring, 1.5, sinks)
        ).max()
        > 0.01
    )


def with_random_sinks(variables, seed):
    """`variables` with every "sinks" parameter drawn from N(0, 1): a test of zeros (their
    initial value) would not notice a step that drops the sinks' values."""
    flat = flax.traverse_util.flatten_dict(variables)
    rng = np.random.default_rng(seed)
    for path, leaf in flat.items():
        if path[-1] == "sinks":
            flat[path] = jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)
    return flax.traverse_util.unflatten_dict(flat)


# Cached decoding with a soft cap and learned sinks: the kernel's step, XLA's over segments
# (one part of the keys after another) and XLA's over gathered keys (the ring and sparse
# layouts share it); the kernel's ring step is checked on its own above.
SOFT_CAP_AND_SINKS_CASES = {
    "full, kernel": (dict(KERNEL_SIZED, positional="rotary"), "prefix kernel", 70),
    "full, alibi, segments": (dict(SMALL, positional="alibi"), "prefix", 130),
    "bigbird, sparse": (
        dict(
            SMALL,
            positional="rotary",
            pattern="bigbird",
            pattern_options=dict(block_size=4, num_anchor_blocks=1, num_random_blocks=2),
        ),
        "sparse",
        40,
    ),
}


@pytest.mark.parametrize("case", list(SOFT_CAP_AND_SINKS_CASES))
def test_cached_decoding_with_soft_cap_and_sinks_equals_the_full_call(case):
    fields, kind, length = SOFT_CAP_AND_SINKS_CASES[case]
    skip_without_kernel(kind)
    fields = dict(fields, logit_soft_cap=1.0, attention_sinks=True)
    model = build_model(dict(name="decoder_lm", **fields))
    tokens = random_tokens(3, 2, length)
    initial = jax.jit(model.init)(jax.random.key(0), tokens)
    variables = with_random_sinks(initial, 0)
    full = assert_cached_decoding_equals_the_full_call(model, variables, tokens, fields, kind)
    if case == "full, kernel":  # the cap and the sinks' values matter: without either, other logits
        uncapped = build_model(dict(name="decoder_lm", **dict(fields, logit_soft_cap=None)))
        assert np.abs(jax.jit(uncapped.apply)(variables, tokens) - full).max() > 1e-3
        assert np.abs(jax.jit(model.apply)(initial, tokens) - full).max() > 1e-3


def test_a_pattern_rule_keeps_excluded_non_finite_values_out():
    """A prefix cache read with the pattern's row rule: a NaN value at a key the pattern
    excludes (anchors only, a non-anchor key) leaves the output finite, as in the reference."""
    pattern = patterns.anchor(3) & patterns.causal()
    cache_plan = kv_cache.plan(pattern, jnp.float32, 8)
    assert (cache_plan.kind, cache_plan.kernel) == ("prefix", False)
    batch, heads, max_len, d = 1, 2, 16, 8
    keys = jax.random.split(jax.random.key(6), 5)
    q, k, v = (jax.random.normal(key, (batch, 1, heads, d)) for key in keys[:3])
    cache = kv_cache.from_prompt(
        cache_plan,
        jax.random.normal(keys[3], (batch, 7, heads, d)),
        jax.random.normal(keys[4], (batch, 7, heads, d)).at[0, 5].set(jnp.nan),
        jnp.array([7]),
        max_len,
    )
    out, _ = kv_cache.step(cache_plan, cache, q, k, v, jnp.array([7]))
    assert np.isfinite(out).all()
    # and a NaN value at an anchor key, which the query sees, gives NaN
    cache["value"][0] = cache["value"][0].at[0, :, 1].set(jnp.nan)
    out, _ = kv_cache.step(cache_plan, cache, q, k, v, jnp.array([7]))
    assert np.isnan(out).all()


class EveryOther(patterns.Pattern):
    """Keys at an even distance: a pattern the cache knows only through its `allows`."""

    def allows(self, q_pos, k_pos, q_len, kv_len):
        return (q_pos - k_pos) % 2 == 0

    def _layout(self, q_blocks, k_blocks):
        return np.full((q_blocks.count, k_blocks.count), patterns.PARTIAL)

    def __eq__(self, other):
        return type(other) is EveryOther

    def __hash__(self):
        return hash(EveryOther)


class NumpyOnly(EveryOther):
    def allows(self, q_pos, k_pos, q_len, kv_len):
        return np.equal(np.remainder(np.subtract(q_pos, k_pos), 2), 0)


def test_another_pattern_decodes_through_its_own_rule():
    tokens = random_tokens(4, 2, 12)
    for pattern, decodes in ((EveryOther(), True), (NumpyOnly(), False)):
        model = build_model(dict(name="decoder_lm", **SMALL, pattern=pattern))
        variables = jax.jit(model.init)(jax.random.key(0), tokens)
        if not decodes:
            with pytest.raises(ValueError, match="its `allows` must compute with jax arrays"):
                decode_all(model, variables, tokens, max_decode_len=12)
            continue
        full = jax.jit(model.apply)(variables, tokens)
        cached = decode_all(model, variables, tokens, max_decode_len=12)
        np.testing.assert_allclose(cached, full, rtol=2e-4, atol=2e-4)


def test_encoder_decoder_decoding_with_soft_cap_and_sinks_equals_the_full_call():
    """Cross-attention with the cap and learned sinks, in decoding (keys and values of the
    source computed once) as in the full call; a padded source row."""
    model = build_model(
        dict(
            name="encoder_decoder",
            **dict(SMALL, num_decoder_layers=1, num_layers=1),
            logit_soft_cap=1.0,
            attention_sinks=True,
        )
    )
    source = random_tokens(5, 2, 9).at[1, 6:].set(0)  # 0 is padding
    targets = random_tokens(6, 2, 7)
    variables = with_random_sinks(jax.jit(model.init)(jax.random.key(0), source, targets), 1)
    sinks = [p for p in flax.traverse_util.flatten_dict(variables) if p[-1] == "sinks"]
    assert len(sinks) == 3  # encoder self-attention, decoder self- and cross-attention
    full = jax.jit(model.apply)(variables, source, targets)

    def run(variables):
        state = model.apply(variables, source, 7, method="init_decode_state")

        def step(state, token):
            logits, state = model.apply(variables, state, token, method="decode_step")
            return state, logits

        return jnp.swapaxes(jax.lax.scan(step, state, shift_right(targets).T)[1], 0, 1)

    np.testing.assert_allclose(jax.jit(run)(variables), full, rtol=2e-4, atol=2e-4)


# Grouped-query (and multi-query) attention: 4 query heads over 2 (or 1) key/value heads, in
# every cache layout; the cache holds the key/value heads only.
GQA = dict(SMALL, num_heads=4)
GQA_KERNEL_SIZED = dict(SMALL, d_model=64, num_heads=4)
GROUPED_QUERY_CASES = {
    "prefix kernel, mqa, sinks and cap": (
        dict(
            GQA_KERNEL_SIZED,
            positional="rotary",
            num_kv_heads=1,
            logit_soft_cap=1.0,
            attention_sinks=True,
        ),
        "prefix kernel",
        40,
    ),
    "ring kernel, alibi": (
        dict(
            GQA_KERNEL_SIZED,
            num_kv_heads=2,
            positional="alibi",
            pattern="sliding_window",
            pattern_options={"left": 4},
        ),
        "ring kernel",
        20,
    ),
    "prefix segments, alibi, sinks": (
        dict(GQA, num_kv_heads=2, positional="alibi", attention_sinks=True),
        "prefix",
        130,
    ),
    "ring with anchors": (
        dict(
            GQA_KERNEL_SIZED,
            num_kv_heads=2,
            positional="rotary",
            pattern="bigbird",
            pattern_options=dict(block_size=2, window_blocks=3, num_random_blocks=0),
        ),
        "ring",
        20,
    ),
    "sparse, mqa, alibi, cap": (
        dict(
            GQA,
            num_kv_heads=1,
            positional="alibi",
            logit_soft_cap=1.0,
            pattern="bigbird",
            pattern_options=dict(block_size=4, num_anchor_blocks=1, num_random_blocks=2),
        ),
        "sparse",
        24,
    ),
}


@pytest.mark.parametrize("case", list(GROUPED_QUERY_CASES))
def test_grouped_query_cached_decoding_equals_the_full_call(case):
    fields, kind, length = GROUPED_QUERY_CASES[case]
    skip_without_kernel(kind)
    model = build_model(dict(name="decoder_lm", **fields))
    tokens = random_tokens(5, 2, length)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    if fields.get("attention_sinks"):
        variables = with_random_sinks(variables, 0)
    state = model.apply(variables, tokens, length, method="init_decode_state")
    cache_heads = {x.shape[1] for x in jax.tree.leaves(state) if x.ndim == 4}
    assert cache_heads == {fields["num_kv_heads"]}
    assert_cached_decoding_equals_the_full_call(model, variables, tokens, fields, kind)
