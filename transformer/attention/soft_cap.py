"""Logit soft-capping (Gemma 2): every score s becomes c * tanh(s / c), which lies in (-c, c).

The cap bounds the attention logits smoothly, so that no single score can grow without limit and
saturate the softmax; Gemma 2 caps its attention logits at 50. It applies to the scaled dot
products s = q.k * scale, as in Gemma 2, and nothing else: ALiBi's distance penalty and a `bias`
are added after the cap (uncapped, so ALiBi still pushes far keys down without bound), and
masking comes last, so an excluded pair stays excluded rather than getting the logit -c.

Its derivative, d/ds [c tanh(s / c)] = 1 - tanh^2(s / c), multiplies the logits' gradient in
the implementations that write their backward pass by hand.
"""

import functools
import math
import numbers

import jax
import jax.numpy as jnp


def check_logit_soft_cap(value):
    """`value` as a Python float, or None (no cap); a ValueError unless it is a finite number
    > 0. It must be static (a Python or NumPy number): kernels are compiled for it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"logit_soft_cap must be None or a finite number > 0 (Gemma 2 uses 50.0); got "
            f"{value!r} of type {type(value).__name__}."
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(
            f"logit_soft_cap must be None or a finite number > 0 (Gemma 2 uses 50.0); got "
            f"{value!r}."
        )
    return value


def soft_cap(logits, cap):
    """c * tanh(logits / c), or `logits` unchanged when `cap` is None; differentiable, with the
    derivative 1 - tanh^2(logits / c)."""
    if cap is None:
        return logits
    return _capped(logits, cap)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _capped(logits, cap):
    return cap * jnp.tanh(logits / cap)


@_capped.defjvp
def _capped_jvp(cap, primals, tangents):
    # The slope times the tangent, as the hand-written backward passes compute it. JAX's own
    # tanh rule, (g + g * tanh) * (1 - tanh), makes an infinite gradient NaN (inf - inf) where
    # this keeps it infinite.
    capped, slope = soft_cap_with_slope(primals[0], cap)
    return capped, tangents[0] * slope


def soft_cap_with_slope(logits, cap):
    """(capped logits, d capped / d logits = 1 - tanh^2(logits / c)); the slope is None when
    `cap` is None."""
    if cap is None:
        return logits, None
    t = jnp.tanh(logits / cap)
    return cap * t, 1.0 - t * t
