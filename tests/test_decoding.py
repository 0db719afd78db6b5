"""Decoding against hand-unrolled loops and exhaustive search, on table models small enough to
enumerate every output sequence."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import decoding

EOS = 1


def table_step(table):
    """A model whose next-token logits are looked up by the whole prefix: table `[batch,
    max_len, vocab ** max_len, vocab]`. The state's position is a scalar leaf, shared by the
    batch like a key/value cache's write index; the prefix id is per row."""
    vocab = table.shape[-1]

    def step(state, token):
        position, prefix = state
        # The start token is not part of the prefix, so decoding depends on the table alone.
        prefix = jnp.where(position == 0, 0, prefix * vocab + token)
        # Beam search runs beam_size rows per example, example-major.
        rows = jnp.arange(token.shape[0]) // (token.shape[0] // table.shape[0])
        logits = table[rows, position, prefix]
        return logits, (position + 1, prefix)

    return step


def initial_state(batch):
    return jnp.array(0, jnp.int32), jnp.zeros((batch,), jnp.int32)


def random_table(seed, batch, max_len, vocab, scale=2.0):
    table = scale * np.random.default_rng(seed).normal(size=(batch, max_len, vocab**max_len, vocab))
    table[..., 0] = 5.0  # token 0 is padding: decoding never emits it, however likely
    return jnp.asarray(table, jnp.float32)


def score(table, row, tokens, alpha):
    """log p(tokens) / length_penalty, in float64; tokens end at EOS or at max_len."""
    table = np.asarray(table, np.float64)[row]
    vocab = table.shape[-1]
    logp, prefix = 0.0, 0
    for position, token in enumerate(tokens):
        logits = table[position, prefix].copy()
        logits[0] = -np.inf  # decoding never emits padding
        logp += logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        prefix = prefix * vocab + token
    return logp / ((5.0 + len(tokens)) / 6.0) ** alpha


def hypotheses(vocab, max_len):
    """Every sequence that ends at its first EOS, or reaches max_len without one."""
    others = [t for t in range(1, vocab) if t != EOS]  # 0, padding, is never emitted
    ended = [
        body + (EOS,)
        for length in range(max_len)
        for body in itertools.product(others, repeat=length)
    ]
    return ended + list(itertools.product(others, repeat=max_len))


def strip(tokens):
    """Generated tokens up to and including the first EOS."""
    tokens = list(np.asarray(tokens))
    return tuple(tokens[: tokens.index(EOS) + 1]) if EOS in tokens else tuple(tokens)


def test_greedy_equals_argmax_unrolled_by_hand():
    batch, max_len, vocab = 6, 4, 4
    table = random_table(0, batch, max_len, vocab)
    step = table_step(table)
    tokens = decoding.greedy(
        step, initial_state(batch), jnp.full((batch,), 2), max_len=max_len, eos_id=EOS
    )
    state, token = initial_state(batch), jnp.full((batch,), 2)
    expected, finished = [], np.zeros(batch, bool)
    for _ in range(max_len):
        logits, state = step(state, token)
        token = jnp.argmax(logits.at[:, 0].set(-jnp.inf), -1)  # never padding
        expected.append(np.where(finished, 0, token))
        finished |= np.asarray(token) == EOS
    np.testing.assert_array_equal(tokens, np.stack(expected, 1))
    assert (np.asarray(tokens) == EOS).any(), "pick a table where some row stops early"
    assert (np.asarray(table[:, 0, 0]).argmax(-1) == 0).any(), "padding must be tempting"


def test_greedy_pads_after_eos_and_without_eos_runs_to_max_len():
    # Row 0 always says EOS; row 1 never does.
    logits = jnp.array([[0.0, 5.0, 1.0], [0.0, -5.0, 1.0]])
    step = lambda state, token: (logits, state)
    tokens = decoding.greedy(step, jnp.zeros(2), jnp.full((2,), 2), max_len=4, eos_id=EOS)
    np.testing.assert_array_equal(tokens, [[EOS, 0, 0, 0], [2, 2, 2, 2]])
    no_eos = decoding.greedy(step, jnp.zeros(2), jnp.full((2,), 2), max_len=3, eos_id=None)
    np.testing.assert_array_equal(no_eos, [[EOS, EOS, EOS], [2, 2, 2]])


def test_beam_of_one_equals_greedy():
    batch, max_len, vocab = 8, 4, 4
    table = random_table(1, batch, max_len, vocab)
    step, start = table_step(table), jnp.full((batch,), 2)
    greedy = decoding.greedy(step, initial_state(batch), start, max_len=max_len, eos_id=EOS)
    beams, scores = decoding.beam_search(
        step, initial_state(batch), start, beam_size=1, max_len=max_len, eos_id=EOS, alpha=0.0
    )
    np.testing.assert_array_equal(beams[:, 0], greedy)
    for row in range(batch):
        np.testing.assert_allclose(
            scores[row, 0], score(table, row, strip(greedy[row]), 0.0), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_wide_beam_finds_the_best_of_all_sequences(alpha):
    batch, max_len, vocab = 12, 4, 4
    table = random_table(2, batch, max_len, vocab)
    step, start = table_step(table), jnp.full((batch,), 2)
    # At least as many beams as any step has candidates: the search is exhaustive.
    beam_size = (vocab - 1) ** (max_len - 1) * vocab
    beams, scores = jax.jit(
        functools.partial(
            decoding.beam_search,
            step,
            beam_size=beam_size,
            max_len=max_len,
            eos_id=EOS,
            alpha=alpha,
        )
    )(initial_state(batch), start)
    greedy = decoding.greedy(step, initial_state(batch), start, max_len=max_len, eos_id=EOS)
    candidates = hypotheses(vocab, max_len)
    greedy_was_worse = 0
    for row in range(batch):
        all_scores = [score(table, row, h, alpha) for h in candidates]
        best = candidates[int(np.argmax(all_scores))]
        assert strip(beams[row, 0]) == best
        np.testing.assert_allclose(scores[row, 0], max(all_scores), rtol=1e-5, atol=1e-5)
        # The ranking below the best is exhaustive too.
        np.testing.assert_allclose(
            scores[row, :5], sorted(all_scores, reverse=True)[:5], rtol=1e-5, atol=1e-5
        )
        greedy_was_worse += score(table, row, strip(greedy[row]), alpha) < max(all_scores) - 1e-6
    assert greedy_was_worse > 0, "the table should have rows where greedy misses the best"


def test_beam_finds_what_greedy_misses_on_a_hand_built_model():
    # Tokens: 0 pad, 1 EOS, 2 "a", 3 "b". First step: a 0.55, b 0.45. After a: EOS 0.4, a 0.3,
    # b 0.3. After b: EOS 0.95. Greedy says "a EOS" (p 0.22); "b EOS" (p 0.43) is best.
    max_len, vocab = 2, 4
    probs = np.full((1, max_len, vocab**max_len, vocab), 1e-9)
    probs[0, 0, 0] = [1e-9, 1e-9, 0.55, 0.45]
    probs[0, 1, 2] = [1e-9, 0.4, 0.3, 0.3]
    probs[0, 1, 3] = [1e-9, 0.95, 0.025, 0.025]
    step, start = table_step(jnp.log(jnp.asarray(probs, jnp.float32))), jnp.full((1,), 2)
    greedy = decoding.greedy(step, initial_state(1), start, max_len=max_len, eos_id=EOS)
    beams, scores = decoding.beam_search(
        step, initial_state(1), start, beam_size=2, max_len=max_len, eos_id=EOS, alpha=0.0
    )
    np.testing.assert_array_equal(greedy, [[2, EOS]])
    np.testing.assert_array_equal(beams[0, 0], [3, EOS])
    np.testing.assert_allclose(scores[0, 0], np.log(0.45 * 0.95), rtol=1e-5, atol=1e-5)


def fixed_logits_step(logits):
    """Logits `[max_len, batch, vocab]` that depend on the step only."""
    return lambda step, token: (logits[step], step + 1)


def test_top_k_never_samples_outside_the_top_k_and_follows_the_renormalised_distribution():
    max_len, batch, vocab, k = 3, 4000, 10, 3
    logits = jax.random.normal(jax.random.key(3), (max_len, 1, vocab)).at[..., 0].set(9.0)
    logits = jnp.broadcast_to(logits, (max_len, batch, vocab))
    tokens = decoding.sample(
        fixed_logits_step(logits),
        jnp.array(0),
        jnp.zeros(batch, jnp.int32),
        jax.random.key(4),
        max_len=max_len,
        top_k=k,
    )
    for step in range(max_len):
        top = 1 + np.argsort(-np.asarray(logits[step, 0, 1:]))[:k]  # padding is never drawn
        assert set(np.unique(tokens[:, step])) == set(top)  # every top-k token, nothing else
        probs = np.asarray(jax.nn.softmax(logits[step, 0, top]))
        freqs = np.array([(tokens[:, step] == t).mean() for t in top])
        np.testing.assert_allclose(freqs, probs, atol=0.03)


def test_temperature_to_zero_approaches_greedy():
    max_len, batch, vocab = 5, 256, 8
    # Logits 0.1 apart, so that temperature 1e-3 leaves the runner-up at exp(-100).
    ranks = jax.vmap(lambda key: jax.random.permutation(key, vocab))(
        jax.random.split(jax.random.key(5), max_len * batch)
    )
    logits = 0.1 * ranks.reshape(max_len, batch, vocab).astype(jnp.float32)
    step, start = fixed_logits_step(logits), jnp.zeros(batch, jnp.int32)
    greedy = decoding.greedy(step, jnp.array(0), start, max_len=max_len)
    samples = jax.jit(
        jax.vmap(
            lambda t: decoding.sample(
                step, jnp.array(0), start, jax.random.key(6), max_len=max_len, temperature=t
            )
        )
    )(jnp.array([1.0, 0.3, 1e-3]))
    agreement = (samples == greedy).mean(axis=(1, 2))
    assert agreement[0] < agreement[1] < agreement[2] == 1.0, agreement


def test_sampling_is_deterministic_from_the_rng_key():
    batch, max_len, vocab = 16, 4, 5
    step = table_step(random_table(7, batch, max_len, vocab, scale=0.5))
    run = jax.jit(
        lambda rng: decoding.sample(
            step,
            initial_state(batch),
            jnp.full((batch,), 2),
            rng,
            max_len=max_len,
            eos_id=EOS,
            top_k=4,
        )
    )
    first, again, other = run(jax.random.key(8)), run(jax.random.key(8)), run(jax.random.key(9))
    np.testing.assert_array_equal(first, again)
    assert (np.asarray(first) != np.asarray(other)).any()


def test_decoder_only_prefill_then_decode_matches_stepping_through_the_prompt():
    batch, max_len, vocab = 3, 5, 3
    table = random_table(10, batch, max_len, vocab)
    step = table_step(table)
    prompt = jnp.array([[2, 0, 2], [0, 0, 2], [2, 2, 0]])  # any tokens; decode from the last
    state = decoding.prefill(step, initial_state(batch), prompt[:, :-1])
    tokens = decoding.greedy(step, state, prompt[:, -1], max_len=max_len - 2, eos_id=EOS)
    state, token = initial_state(batch), prompt[:, 0]
    for t in range(1, prompt.shape[1]):
        _, state = step(state, token)
        token = prompt[:, t]
    expected = []
    for _ in range(max_len - 2):
        logits, state = step(state, token)
        token = jnp.argmax(logits.at[:, 0].set(-jnp.inf), -1)  # never padding
        expected.append(token)
    expected = np.stack(expected, 1)
    # Padding after EOS is the only difference from plain argmax.
    for row in range(batch):
        assert strip(tokens[row]) == strip(expected[row])


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda s: decoding.sample(
                s, None, jnp.zeros(1, jnp.int32), jax.random.key(0), max_len=2, temperature=0.0
            ),
            "temperature",
        ),
        (
            lambda s: decoding.sample(
                s, None, jnp.zeros(1, jnp.int32), jax.random.key(0), max_len=2, top_k=9
            ),
            "top_k",
        ),
        (
            lambda s: decoding.beam_search(
                s, None, jnp.zeros(1, jnp.int32), beam_size=0, max_len=2, eos_id=EOS
            ),
            "beam_size",
        ),
        (
            lambda s: decoding.beam_search(
                s, None, jnp.zeros(1, jnp.int32), beam_size=2, max_len=2, eos_id=EOS, alpha=-1.0
            ),
            "alpha",
        ),
    ],
)
def test_bad_arguments_are_named(call, message):
    step = lambda state, token: (jnp.zeros((token.shape[0], 5)), state)
    with pytest.raises(ValueError, match=message):
        call(step)
