"""What every implementation shares about its arrays: the q/k/v layout, and loop carry types."""

import jax


def check_query_key_value(query, key, value):
    """Raises a ValueError naming the mismatch unless q, k, v are consistent 4-D arrays."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(
            "query, key and value must be [batch, length, heads, head_dim]; got shapes "
            f"{query.shape}, {key.shape}, {value.shape}."
        )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key {key.shape} and value {value.shape} must agree on [batch, kv_len, heads]."
        )
    if query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(f"query {query.shape} and key {key.shape} must agree on batch and heads.")
    if query.shape[3] != key.shape[3]:
        raise ValueError(f"query head_dim {query.shape[3]} != key head_dim {key.shape[3]}.")


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
