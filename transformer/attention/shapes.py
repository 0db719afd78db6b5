"""What every implementation shares about its arrays: the q/k/v layout, and loop carry types."""

import jax
import jax.numpy as jnp
import numpy as np

_NAMES = ("query", "key", "value")
_AXES = {"query": "q_len", "key": "kv_len", "value": "kv_len"}


def check_query_key_value(query, key, value):
    """Raises before any computation unless q, k, v are consistent floating 4-D arrays.

    query `[batch, q_len, heads, head_dim]`, key `[batch, kv_len, kv_heads, head_dim]` and value
    `[batch, kv_len, kv_heads, value_dim]`, where kv_heads divides heads (grouped-query
    attention: query head n reads key/value head n // (heads // kv_heads)), must be jax or
    NumPy arrays (a TypeError otherwise: a list is not converted, so that what reaches the
    kernels is what the caller built), of a floating dtype (a TypeError otherwise: integer
    inputs would give integer, truncated outputs), with no empty dimension: a length of 0 is a
    ValueError in every implementation, as the patterns refuse it too. Mismatched shapes are a
    ValueError naming the mismatch.
    """
    arrays = dict(zip(_NAMES, (query, key, value)))
    for name, array in arrays.items():
        if not isinstance(array, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{name} must be a jax or NumPy array; got {type(array).__name__}. Convert it "
                "with jnp.asarray first."
            )
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "query, key and value must be [batch, length, heads, head_dim]; got shapes "
            f"{query.shape}, {key.shape}, {value.shape}."
        )
    for name, array in arrays.items():
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(
                f"{name} must have a floating dtype (float32, bfloat16, float16, float64, ...); "
                f"got {array.dtype}. Cast it with .astype(jnp.float32)."
            )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key {key.shape} and value {value.shape} must agree on [batch, kv_len, heads]."
        )
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"query {query.shape} and key {key.shape} must agree on batch.")
    if key.shape[2] < 1 or query.shape[2] % key.shape[2]:
        raise ValueError(
            f"query {query.shape} and key {key.shape} must agree on batch and heads, or have "
            f"key/value heads ({key.shape[2]}) dividing the query's heads ({query.shape[2]}): "
            "kv_heads == heads is multi-head, 1 multi-query, any other divisor grouped-query "
            "attention."
        )
    if query.shape[3] != key.shape[3]:
        raise ValueError(f"query head_dim {query.shape[3]} != key head_dim {key.shape[3]}.")
    for name, array in arrays.items():
        axes = ("batch", _AXES[name], "heads", "value_dim" if name == "value" else "head_dim")
        for axis, size in zip(axes, array.shape):
            if size < 1:
                raise ValueError(
                    f"{name} {axis} must be at least 1; got {name} of shape {array.shape}. "
                    "Empty inputs are refused by every implementation."
                )


def group_size(query, key):
    """How many query heads share each key/value head: heads // kv_heads (1 for multi-head)."""
    return query.shape[2] // key.shape[2]


def varying_like(arrays, *inits):
    """Marks loop initial values as varying over the mesh axes that `arrays` vary over.

    Inside `jax.shard_map` a loop's carry must keep its type; zeros made from scratch are
    replicated, while the carry they become depends on per-device inputs. Outside it, a no-op.
    """
    axes = frozenset().union(*(jax.typeof(a).mat.varying for a in arrays if a is not None))
    marked = []
    for x in inits:
        missing = tuple(sorted(axes - jax.typeof(x).mat.varying))
        marked.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return tuple(marked)
