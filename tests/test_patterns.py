"""Attention patterns: masks against brute-force definitions, block layouts, seeds, registry."""

import os
import subprocess
import sys
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer import patterns
from transformer.patterns import EMPTY, FULL, PARTIAL


def brute_force_mask(allows, q_len, kv_len):
    return np.array([[bool(allows(i, j)) for j in range(kv_len)] for i in range(q_len)])


# Rules for predicate(): module-level functions, so each predicate is one object (hashable, and
# the same pattern in every hypothesis example).
def checkerboard(i, j):
    return (i + j) % 2 == 0


def dilated_causal(i, j):
    return (j <= i) & ((i - j) % 3 == 0)


def lopsided_band(i, j):
    return (i - j <= 4) & (j - i <= 1)


PREDICATES = [
    patterns.predicate(checkerboard, "checkerboard"),
    patterns.predicate(dilated_causal, "dilated_causal"),
    patterns.predicate(lopsided_band, "lopsided_band"),
]


def test_primitive_masks_match_their_definitions():
    q_len, kv_len = 13, 17
    anchors = {0, 1, 2, 9}
    random_table = patterns.random(2, 4, seed=5).key_blocks(q_len, kv_len)
    definitions = {
        patterns.full(): lambda i, j: True,
        patterns.causal(): lambda i, j: j <= i,
        patterns.sliding_window(2): lambda i, j: i - 2 <= j <= i + 2,
        patterns.sliding_window(3, 0): lambda i, j: i - 3 <= j <= i,
        patterns.anchor(3): lambda i, j: i < 3 or j < 3,
        patterns.anchor(positions=anchors): lambda i, j: i in anchors or j in anchors,
        patterns.random(2, 4, seed=5): lambda i, j: j // 4 in random_table[i // 4],
        patterns.strided(1): lambda i, j: True,
        patterns.strided(3): lambda i, j: (i - j) % 3 == 0,
        patterns.strided(20): lambda i, j: i == j,
        patterns.lra_local(4): lambda i, j: (i - j) % 5 == 0,  # 17 keys padded to 20: 5 groups
        patterns.prefix_lm(0): lambda i, j: j <= i,
        patterns.prefix_lm(5): lambda i, j: j <= i or (i < 5 and j < 5),
        patterns.prefix_lm(15): lambda i, j: j <= i or (i < 15 and j < 15),  # past q_len
        PREDICATES[0]: lambda i, j: (i + j) % 2 == 0,
        PREDICATES[1]: lambda i, j: j <= i and (i - j) % 3 == 0,
        patterns.predicate(lambda i, j: True, "everything"): lambda i, j: True,  # a scalar
    }
    for pattern, allows in definitions.items():
        mask = pattern.mask(q_len, kv_len)
        assert mask.dtype == bool and mask.shape == (q_len, kv_len)
        np.testing.assert_array_equal(
            mask, brute_force_mask(allows, q_len, kv_len), err_msg=str(pattern)
        )


def test_composition_is_logical_or_and_and():
    window, anchors, randoms = (
        patterns.sliding_window(1),
        patterns.anchor(2),
        patterns.random(1, 3, seed=1),
    )
    masks = [p.mask(11, 11) for p in (window, anchors, randoms)]
    causal = patterns.causal().mask(11, 11)
    np.testing.assert_array_equal(
        (window | anchors | randoms).mask(11, 11), masks[0] | masks[1] | masks[2]
    )
    np.testing.assert_array_equal(
        ((window | anchors) & patterns.causal()).mask(11, 11), (masks[0] | masks[1]) & causal
    )
    np.testing.assert_array_equal(
        (window & anchors | randoms).mask(11, 11), masks[0] & masks[1] | masks[2]
    )
    assert (window | anchors | randoms).parts == (window, anchors, randoms)  # flattened
    with pytest.raises(TypeError, match="combine only with patterns"):
        patterns.causal() & np.ones((3, 3), bool)


def test_causal_window_example_from_docstring():
    expected = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
    np.testing.assert_array_equal(
        (patterns.sliding_window(2) & patterns.causal()).mask(4, 4), np.array(expected, bool)
    )


def primitive_patterns():
    return st.one_of(
        st.just(patterns.full()),
        st.just(patterns.causal()),
        st.builds(patterns.sliding_window, st.integers(0, 9), st.integers(0, 9)),
        st.builds(patterns.anchor, st.integers(1, 6)),
        st.builds(
            lambda p: patterns.anchor(positions=p),
            st.lists(st.integers(0, 40), min_size=1, max_size=4),
        ),
        st.builds(patterns.random, st.integers(1, 3), st.integers(1, 9), st.integers(0, 99)),
        st.builds(patterns.strided, st.integers(1, 9)),
        st.builds(patterns.lra_local, st.integers(1, 9)),
        st.builds(patterns.prefix_lm, st.integers(0, 40)),
        st.sampled_from(PREDICATES),
    )


def any_patterns():
    return st.recursive(
        primitive_patterns(),
        lambda children: st.one_of(
            st.builds(lambda a, b: a | b, children, children),
            st.builds(lambda a, b: a & b, children, children),
        ),
        max_leaves=4,
    )


def blocked(mask, layout, block_q, block_kv):
    """`mask` padded with False to whole blocks, as `[num_q_blocks, block_q, num_k_blocks, block_kv]`."""
    padded = np.zeros((layout.shape[0] * block_q, layout.shape[1] * block_kv), bool)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    return padded.reshape(layout.shape[0], block_q, layout.shape[1], block_kv)


@settings(max_examples=150, deadline=None)
@given(
    any_patterns(), st.integers(1, 50), st.integers(1, 50), st.integers(1, 12), st.integers(1, 12)
)
def test_block_layout_never_skips_an_allowed_pair_nor_calls_a_masked_block_full(
    pattern, q_len, kv_len, block_q, block_kv
):
    mask = pattern.mask(q_len, kv_len)
    layout = pattern.block_layout(q_len, kv_len, block_q, block_kv)
    assert layout.shape == (-(-q_len // block_q), -(-kv_len // block_kv))
    assert set(np.unique(layout)) <= {EMPTY, PARTIAL, FULL}
    blocks = blocked(mask, layout, block_q, block_kv)
    assert not blocks.any(axis=(1, 3))[layout == EMPTY].any()
    assert blocks.all(axis=(1, 3))[layout == FULL].all()  # padding is never "allowed"


@settings(max_examples=100, deadline=None)
@given(
    primitive_patterns(), st.integers(1, 6), st.integers(1, 6), st.integers(1, 8), st.integers(1, 8)
)
def test_block_layout_of_a_primitive_is_exact_on_whole_blocks(
    pattern, q_blocks, kv_blocks, block_q, block_kv
):
    q_len, kv_len = q_blocks * block_q, kv_blocks * block_kv
    layout = pattern.block_layout(q_len, kv_len, block_q, block_kv)
    blocks = blocked(pattern.mask(q_len, kv_len), layout, block_q, block_kv)
    expected = np.where(
        blocks.all(axis=(1, 3)), FULL, np.where(blocks.any(axis=(1, 3)), PARTIAL, EMPTY)
    )
    np.testing.assert_array_equal(layout, expected)


def test_causal_block_layout_is_the_lower_triangle():
    layout = patterns.causal().block_layout(10, 10, 4)
    np.testing.assert_array_equal(
        layout, [[PARTIAL, EMPTY, EMPTY], [FULL, PARTIAL, EMPTY], [PARTIAL, PARTIAL, PARTIAL]]
    )


def test_strided_one_is_full_and_prefix_lm_zero_is_causal():
    for pattern, same in (
        (patterns.strided(1), patterns.full()),
        (patterns.prefix_lm(0), patterns.causal()),
    ):
        np.testing.assert_array_equal(pattern.mask(23, 19), same.mask(23, 19))
        for block_q, block_kv in ((4, 4), (5, 3), (23, 1)):
            np.testing.assert_array_equal(
                pattern.block_layout(23, 19, block_q, block_kv),
                same.block_layout(23, 19, block_q, block_kv),
            )


def test_strided_is_long_range_arena_local_attention():
    """LRA's LocalAttention reshapes [length] to [block_size, num_blocks] and attends along
    block_size: positions attend within their column, which is strided(num_blocks)."""
    block_size, num_blocks = 6, 4
    column = np.arange(block_size * num_blocks).reshape(block_size, num_blocks)
    group = np.empty(block_size * num_blocks, int)
    group[column] = np.arange(num_blocks)[None, :]
    expected = group[:, None] == group[None, :]
    np.testing.assert_array_equal(patterns.strided(num_blocks).mask(24, 24), expected)


def test_strided_layout_skips_blocks_without_a_multiple_of_the_stride():
    # Blocks of 2 queries x 2 keys, r and c apart: the differences i - j span 2(r - c) - 1 ..
    # 2(r - c) + 1, which holds a multiple of 4 only when r - c is even.
    layout = patterns.strided(4).block_layout(8, 8, 2)
    np.testing.assert_array_equal(
        layout, np.where(np.add.outer(range(4), range(4)) % 2, EMPTY, PARTIAL)
    )
    # One-by-one blocks are exactly the mask.
    np.testing.assert_array_equal(
        patterns.strided(3).block_layout(7, 9, 1),
        np.where(patterns.strided(3).mask(7, 9), FULL, EMPTY),
    )


def test_prefix_lm_layout_across_the_prefix_boundary():
    # Prefix of 6 with blocks of 4: key block 1 (keys 4..7) straddles the prefix.
    layout = patterns.prefix_lm(6).block_layout(12, 12, 4)
    np.testing.assert_array_equal(
        layout,
        [[FULL, PARTIAL, EMPTY], [FULL, PARTIAL, EMPTY], [FULL, FULL, PARTIAL]],
    )


def test_predicate_equals_the_pattern_it_describes():
    rule = patterns.predicate(lambda i, j: j <= i, "causal")
    assert str(rule) == "causal" and str(rule | patterns.anchor(1)) == "causal | anchor(1)"
    for q_len, kv_len, block_q, block_kv in ((13, 13, 4, 4), (17, 29, 5, 3), (40, 9, 8, 8)):
        np.testing.assert_array_equal(
            rule.mask(q_len, kv_len), patterns.causal().mask(q_len, kv_len)
        )
        np.testing.assert_array_equal(
            rule.block_layout(q_len, kv_len, block_q, block_kv),
            patterns.causal().block_layout(q_len, kv_len, block_q, block_kv),
        )
    # Equal and hashed by the function object and the name.
    assert (
        rule == patterns.predicate(rule.fn, "causal")
        and len({rule, patterns.predicate(rule.fn, "causal")}) == 1
    )
    assert rule != patterns.predicate(rule.fn, "other")
    assert rule != patterns.predicate(lambda i, j: j <= i, "causal")


def test_predicate_layout_at_64k_tokens_builds_no_full_mask():
    """65,536 tokens in blocks of 512: the full mask would be 4 GiB of bools; the layout is
    computed tile by tile with a few MB."""
    rule = patterns.predicate(lambda i, j: j <= i, "causal")
    tracemalloc.start()
    try:
        started = time.perf_counter()
        layout = rule.block_layout(65536, 65536, 512)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(layout, patterns.causal().block_layout(65536, 65536, 512))
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert seconds < 30, f"{seconds:.1f} s"


def test_new_patterns_compute_with_jax_arrays():
    """Decoding (kv_cache.row_allows) evaluates `allows` on traced positions."""
    q_pos, k_pos = jnp.arange(11)[:, None], jnp.arange(13)[None, :]
    for pattern in (patterns.strided(3), patterns.prefix_lm(4), PREDICATES[1]):
        allowed = jax.jit(lambda q, k, p=pattern: p.allows(q, k, 11, 13))(q_pos, k_pos)
        np.testing.assert_array_equal(
            np.asarray(allowed), pattern.mask(11, 13), err_msg=str(pattern)
        )


def test_random_blocks_per_query_block_and_determinism():
    pattern = patterns.random(3, 8, seed=7)
    table = pattern.key_blocks(64, 80)
    assert table.shape == (8, 3)
    assert all(len(set(row)) == 3 for row in table)
    np.testing.assert_array_equal(table, patterns.random(3, 8, seed=7).key_blocks(64, 80))
    assert not np.array_equal(table, patterns.random(3, 8, seed=8).key_blocks(64, 80))
    # A longer query does not change the earlier blocks' draws.
    np.testing.assert_array_equal(table, pattern.key_blocks(128, 80)[:8])
    # More blocks asked for than exist: every key block, once.
    np.testing.assert_array_equal(patterns.random(5, 8, seed=0).key_blocks(16, 16), [[0, 1]] * 2)


def test_random_pattern_is_the_same_in_another_process():
    code = (
        "from transformer import patterns; "
        "print(patterns.build('bigbird', layer=2, block_size=4).mask(40, 40).sum(1).tolist())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    here = patterns.build("bigbird", layer=2, block_size=4).mask(40, 40).sum(1).tolist()
    assert other == str(here)


def test_build_registry_and_layer_seeds():
    assert {"full", "causal", "sliding_window", "anchor", "random", "bigbird"} <= set(
        patterns.PATTERNS
    )
    assert patterns.build("causal") == patterns.causal()
    assert patterns.build("sliding_window", left=4) == patterns.sliding_window(4)
    assert patterns.build("strided", stride=4) == patterns.strided(4)
    assert patterns.build("prefix_lm", layer=2, prefix_length=8) == patterns.prefix_lm(8)
    assert "predicate" not in patterns.PATTERNS  # a function is not a config value
    layer0 = patterns.build("bigbird", layer=0, block_size=4)
    layer1 = patterns.build("bigbird", layer=1, block_size=4)
    assert layer0 != layer1
    assert not np.array_equal(layer0.mask(64, 64), layer1.mask(64, 64))
    assert layer0 == patterns.build("bigbird", layer=0, block_size=4)
    assert patterns.layer_seed(0, 1) != patterns.layer_seed(1, 0)
    with pytest.raises(ValueError, match="unknown attention pattern 'dilated'.*allowed"):
        patterns.build("dilated")
    with pytest.raises(ValueError, match="takes no option.*'width'.*allowed"):
        patterns.build("sliding_window", width=3)
    with pytest.raises(ValueError, match=r"pattern 'strided' needs option\(s\) \['stride'\]"):
        patterns.build("strided")


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="left must be an integer >= 0"):
        patterns.sliding_window(-1)
    with pytest.raises(ValueError, match="exactly one of num_anchors or positions"):
        patterns.anchor()
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 1"):
        patterns.random(0, 4)
    with pytest.raises(ValueError, match="q_len must be a positive integer"):
        patterns.causal().mask(0, 3)
    with pytest.raises(ValueError, match="window_blocks must be odd"):
        patterns.bigbird(window_blocks=2)
    for bad in (0, -2, 2.0, True, "4"):
        with pytest.raises(ValueError, match="stride must be an integer >= 1"):
            patterns.strided(bad)
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        patterns.build("strided", stride=0)
    with pytest.raises(ValueError, match="prefix_length must be an integer >= 0"):
        patterns.prefix_lm(-1)
    with pytest.raises(TypeError, match="predicate fn must be callable"):
        patterns.predicate(np.ones((4, 4), bool), "mask")
    with pytest.raises(ValueError, match="predicate name must be a non-empty string"):
        patterns.predicate(checkerboard, "")


def test_bigbird_is_the_union_it_claims():
    pattern = patterns.bigbird(
        block_size=4, window_blocks=3, num_anchor_blocks=1, num_random_blocks=2, seed=3
    )
    expected = patterns.sliding_window(4) | patterns.anchor(4) | patterns.random(2, 4, seed=3)
    np.testing.assert_array_equal(pattern.mask(48, 48), expected.mask(48, 48))
    assert 0 < pattern.density(256, 256) < 0.35


def test_patterns_are_static_arguments_under_jit():
    def masked_sum(x, pattern):
        return jnp.where(pattern.mask(*x.shape), x, 0.0).sum()

    masked_sum = jax.jit(masked_sum, static_argnums=1)
    x = jnp.ones((6, 6))
    assert float(masked_sum(x, patterns.causal())) == 21.0
    assert float(masked_sum(x, patterns.sliding_window(1) & patterns.causal())) == 11.0
    assert float(masked_sum(x, patterns.strided(2))) == 18.0
    assert float(masked_sum(x, patterns.prefix_lm(3))) == 24.0
    assert float(masked_sum(x, patterns.predicate(checkerboard, "checkerboard"))) == 18.0


def test_draw_writes_a_png(tmp_path):
    path = tmp_path / "bigbird.png"
    patterns.bigbird(block_size=4).draw(32, path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_is_the_identity_of_and_and_absorbs_or():
    window = patterns.sliding_window(3)
    assert patterns.full() & patterns.causal() == patterns.causal()
    assert patterns.causal() & patterns.full() == patterns.causal()
    assert patterns.full() | window == patterns.full()
    assert window & window == window and window | window == window
    composed = (patterns.full() & window) | patterns.anchor(2)
    np.testing.assert_array_equal(
        composed.mask(37, 37), window.mask(37, 37) | patterns.anchor(2).mask(37, 37)
    )
