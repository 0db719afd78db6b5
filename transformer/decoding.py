"""Decoding: greedy, temperature and top-k sampling, and beam search, for any step function.

A model plugs in through a state and a step function:

  state:    a pytree whose array leaves have the batch as leading axis, `[batch, ...]`; scalar
            leaves (a key/value cache's write index, say) are shared by the whole batch.
  step_fn:  `step_fn(state, token) -> (logits, new_state)`, token `[batch]` int32, logits
            `[batch, vocab]`: feed one token, get the distribution of the next one.

An RNN's state is its carry (plus the encoder memory it attends to); a transformer's is its
key/value cache. Every function here is pure and built from `lax` loops, so the caller jits it
with the model's parameters as traced arguments (see `generate`, and docs/decoding.md).

Outputs are `[batch, max_len]` generated tokens, without the start token; a sequence that emits
`eos_id` keeps it and is padded with `pad_id` after it. `eos_id=None` never stops early. The
padding id is never generated (its logit is masked), so padding in an output is unambiguous.
"""

import functools

import jax
import jax.numpy as jnp

# A finite "minus infinity" for beam log-probabilities: -inf would turn into NaN in -inf - -inf.
NEG_INF = -1.0e9


def prefill(step_fn, state, tokens):
    """Feeds `tokens` `[batch, length]` one by one; returns the state after the last one.

    For decoder-only models: prefill all prompt tokens but the last, then decode from the last.
    """

    def body(state, token):
        _, state = step_fn(state, token)
        return state, None

    state, _ = jax.lax.scan(body, state, jnp.swapaxes(tokens, 0, 1))
    return state


def _decode_loop(step_fn, state, start_tokens, choose, *, max_len, eos_id, pad_id):
    """Runs `choose(logits [batch, vocab], step) -> tokens [batch]` until max_len or all EOS."""
    batch = start_tokens.shape[0]

    def not_done(carry):
        step, _, _, _, finished = carry
        return (step < max_len) & ~jnp.all(finished)

    def body(carry):
        step, state, token, out, finished = carry
        logits, state = step_fn(state, token)
        logits = logits.astype(jnp.float32).at[:, pad_id].set(-jnp.inf)
        next_token = jnp.where(finished, pad_id, choose(logits, step)).astype(jnp.int32)
        out = out.at[:, step].set(next_token)
        if eos_id is not None:
            finished = finished | (next_token == eos_id)
        return step + 1, state, next_token, out, finished

    out = jnp.full((batch, max_len), pad_id, jnp.int32)
    carry = (
        jnp.array(0, jnp.int32),
        state,
        start_tokens.astype(jnp.int32),
        out,
        jnp.zeros((batch,), bool),
    )
    return jax.lax.while_loop(not_done, body, carry)[3]


def greedy(step_fn, state, start_tokens, *, max_len, eos_id=None, pad_id=0):
    """The most likely next token at every step. Returns `[batch, max_len]`."""
    choose = lambda logits, step: jnp.argmax(logits, axis=-1)
    return _decode_loop(
        step_fn, state, start_tokens, choose, max_len=max_len, eos_id=eos_id, pad_id=pad_id
    )


def top_k_logits(logits, k):
    """`[..., vocab]` logits with everything below the k-th largest set to -inf."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, vocab={logits.shape[-1]}]; got {k}.")
    kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def sample(
    step_fn,
    state,
    start_tokens,
    rng,
    *,
    max_len,
    eos_id=None,
    pad_id=0,
    temperature=1.0,
    top_k=None,
):
    """Samples from softmax(logits / temperature), optionally only among the top k tokens.

    temperature: > 0 (a float, or an array so that one compiled function serves many);
      small values approach greedy, 1 samples the model's distribution.
    top_k: None for the whole vocabulary, else an int in [1, vocab].
    The same `rng` gives the same tokens: step i draws with `jax.random.fold_in(rng, i)`.
    Returns `[batch, max_len]`.
    """
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use `greedy` for argmax); got {temperature}.")

    def choose(logits, step):
        logits = logits / temperature
        if top_k is not None:
            logits = top_k_logits(logits, top_k)
        return jax.random.categorical(jax.random.fold_in(rng, step), logits, axis=-1)

    return _decode_loop(
        step_fn, state, start_tokens, choose, max_len=max_len, eos_id=eos_id, pad_id=pad_id
    )


def length_penalty(length, alpha):
    """GNMT's ((5 + length) / 6) ** alpha (Wu et al., 2016); alpha = 0 is plain log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


def _tile_beams(tree, beam_size):
    """`[batch, ...]` leaves -> `[batch * beam, ...]`, each example repeated beam_size times."""
    return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, beam_size, axis=0), tree)


def _gather_beams(tree, parent, batch, beam_size):
    """Picks, for each new beam, the state of its parent beam `parent` `[batch, beam]`."""
    rows = jnp.arange(batch)[:, None]

    def gather(x):
        if x.ndim == 0:
            return x
        x = x.reshape((batch, beam_size) + x.shape[1:])[rows, parent]
        return x.reshape((batch * beam_size,) + x.shape[2:])

    return jax.tree.map(gather, tree)


def beam_search(step_fn, state, start_tokens, *, beam_size, max_len, eos_id, alpha=0.6, pad_id=0):
    """Beam search ranking finished hypotheses by log p(y) / length_penalty(|y|, alpha).

    |y| counts the generated tokens including EOS. A hypothesis still alive at max_len counts as
    finished there. Each step extends every alive beam by every token and keeps the beam_size
    most likely candidates; those that end (EOS or max_len) move to the finished set and the
    rest stay alive, so a step where k candidates end continues k fewer beams, and beam_size 1
    is exactly greedy decoding. The search stops when no beam is alive, or when no alive beam can
    still beat the worst of beam_size finished ones: with alpha >= 0 an alive beam's score can
    never rise above log p / length_penalty(max_len).

    Returns:
      tokens `[batch, beam_size, max_len]` best first, and scores `[batch, beam_size]`; slots
      that no hypothesis reached (a tiny vocabulary) score NEG_INF.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1; got {beam_size}.")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (the early stop relies on it); got {alpha}.")
    batch = start_tokens.shape[0]
    max_penalty = length_penalty(max_len, alpha)
    # Only beam 0 starts alive: the others would duplicate it.
    alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (beam_size - 1)), (batch, 1))
    carry = (
        jnp.array(0, jnp.int32),
        _tile_beams(state, beam_size),
        jnp.repeat(start_tokens.astype(jnp.int32)[:, None], beam_size, axis=1),  # last tokens
        jnp.full((batch, beam_size, max_len), pad_id, jnp.int32),  # alive sequences
        alive_logp,
        jnp.full((batch, beam_size, max_len), pad_id, jnp.int32),  # finished sequences
        jnp.full((batch, beam_size), NEG_INF),  # finished scores, sorted best first
    )

    def not_done(carry):
        step, _, _, _, alive_logp, _, finished_score = carry
        best_alive_can_reach = alive_logp[:, 0] / max_penalty
        settled = (finished_score[:, -1] > best_alive_can_reach) | (alive_logp[:, 0] < NEG_INF / 2)
        return (step < max_len) & ~jnp.all(settled)

    def body(carry):
        step, state, token, alive_seq, alive_logp, finished_seq, finished_score = carry
        logits, state = step_fn(state, token.reshape(batch * beam_size))
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32).at[:, pad_id].set(-jnp.inf))
        logp = jnp.maximum(logp, NEG_INF).reshape(batch, beam_size, vocab)  # no -inf: no NaN
        candidates = (alive_logp[:, :, None] + logp).reshape(batch, beam_size * vocab)
        cand_logp, flat_index = jax.lax.top_k(candidates, beam_size)
        parent, cand_token = flat_index // vocab, flat_index % vocab
        rows = jnp.arange(batch)[:, None]
        cand_seq = alive_seq[rows, parent].at[:, :, step].set(cand_token)
        ends = (step + 1 == max_len) | (cand_token == eos_id)
        real = cand_logp > NEG_INF / 2

        alive_logp, pick = jax.lax.top_k(jnp.where(ends, NEG_INF, cand_logp), beam_size)
        alive_seq = cand_seq[rows, pick]
        token = cand_token[rows, pick]
        state = _gather_beams(state, parent[rows, pick], batch, beam_size)

        cand_score = jnp.where(ends & real, cand_logp / length_penalty(step + 1, alpha), NEG_INF)
        finished_score, pick = jax.lax.top_k(
            jnp.concatenate([finished_score, cand_score], axis=1), beam_size
        )
        finished_seq = jnp.concatenate([finished_seq, cand_seq], axis=1)[rows, pick]
        return step + 1, state, token, alive_seq, alive_logp, finished_seq, finished_score

    carry = jax.lax.while_loop(not_done, body, carry)
    return carry[5], carry[6]


def _greedy_strategy(step_fn, state, start_tokens, rng, **kwargs):
    return greedy(step_fn, state, start_tokens, **kwargs)


def _sample_strategy(step_fn, state, start_tokens, rng, **kwargs):
    if rng is None:
        raise ValueError("strategy='sample' needs an rng key.")
    return sample(step_fn, state, start_tokens, rng, **kwargs)


def _beam_strategy(step_fn, state, start_tokens, rng, **kwargs):
    tokens, _ = beam_search(step_fn, state, start_tokens, **kwargs)
    return tokens[:, 0]


STRATEGIES = {"greedy": _greedy_strategy, "sample": _sample_strategy, "beam": _beam_strategy}


@functools.partial(jax.jit, static_argnames=("model", "strategy", "max_len", "eos_id", "options"))
def _generate(model, variables, inputs, rng, *, strategy, max_len, eos_id, options):
    state = model.apply(variables, inputs, max_len, method=model.init_decode_state)
    step_fn = functools.partial(model.apply, variables, method=model.decode_step)
    start = jnp.full((inputs.shape[0],), model.bos_id, jnp.int32)
    return STRATEGIES[strategy](
        step_fn, state, start, rng, max_len=max_len, eos_id=eos_id, **dict(options)
    )


def generate(
    model, variables, inputs, *, eos_id, max_len=None, strategy="greedy", rng=None, **options
):
    """Jitted decoding of a sequence-to-sequence Flax model from source `inputs` `[batch, len]`.

    The model provides `init_decode_state(inputs, max_decode_len) -> state`,
    `decode_step(state, token) -> (logits, state)`, a `bos_id` field and a `max_decode_len`
    property, the default of max_len (a transformer's config.max_len). strategy: one of STRATEGIES ('greedy', 'sample',
    'beam'); options go to that function (temperature, top_k; beam_size, alpha). Beam search
    returns its best hypothesis. Returns `[batch, max_len]` tokens.
    """
    max_len = model.max_decode_len if max_len is None else max_len
    if max_len is None:
        raise ValueError(f"{type(model).__name__} has no default max_len: pass max_len.")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {sorted(STRATEGIES)}.")
    return _generate(
        model,
        variables,
        inputs,
        rng,
        strategy=strategy,
        max_len=max_len,
        eos_id=eos_id,
        options=tuple(sorted(options.items())),
    )
