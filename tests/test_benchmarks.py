"""The benchmarks run end to end and record their machine, and the block-products floor computes
attention."""

import csv
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import patterns
from transformer.attention import block_sparse, dot_product_attention

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
import block_products  # noqa: E402  (benchmarks/ is not a package)
import machine  # noqa: E402

from transformer.training import provenance  # noqa: E402

BIGBIRD = patterns.bigbird(block_size=64, window_blocks=3, num_anchor_blocks=2, num_random_blocks=3)


def run(program, *args):
    """Runs benchmarks/<program> with `args`; returns its stdout."""
    done = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, program), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_records_this_machine(rows, stdout):
    """Every row names this machine's CPU, cores, devices and versions; the tables are captioned
    with `provenance.describe()`."""
    expected = {key: str(value) for key, value in machine.columns().items()}
    assert rows and all({key: row[key] for key in expected} == expected for row in rows), rows[0]
    assert expected["versions"].startswith("jax ") and int(expected["cpu_cores"]) > 0
    assert provenance.describe() in stdout


def test_block_products_compute_the_scheduled_rows_of_attention():
    length, heads, dim = 1024, 2, 16
    q, k, v = (
        jax.random.normal(key, (1, length, heads, dim))
        for key in jax.random.split(jax.random.key(0), 3)
    )
    step, (layouts, masks) = block_products.make_step(BIGBIRD, q, k, v, 64)
    grads = step(layouts, masks, q, k, v)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))

    reference = np.asarray(dot_product_attention(q, k, v, pattern=BIGBIRD, implementation="dense"))
    plan = block_sparse.make_plan(BIGBIRD, length, length, 64, 64)
    checked = 0
    for schedule, layout, mask in zip(plan.schedules, layouts, masks):
        out = np.asarray(block_products._scheduled_rows(*layout, mask))  # [steps, h, items, 64, d]
        for step_index, item in zip(*np.nonzero(schedule.q_block < plan.num_q_blocks)):
            row = schedule.q_block[step_index, item]
            expected = reference[0, row * 64 : (row + 1) * 64].transpose(1, 0, 2)  # [h, 64, d]
            np.testing.assert_allclose(out[step_index, :, item], expected, atol=1e-5)
            checked += 1
    assert checked == length // 64 - len(plan.dense_q_blocks)


def test_block_products_refuses_row_pieces():
    q = k = v = np.zeros((1, 512, 1, 8), np.float32)
    with pytest.raises(ValueError, match="whole-row"):
        block_products.make_step(patterns.causal(), q, k, v, 64)


def test_attention_benchmark_writes_its_table(tmp_path):
    pairs = "full:chunked,bigbird:block_sparse,bigbird:block_products"
    stdout = run(
        "attention_benchmark.py",
        *("--lengths", 512, "--pairs", pairs, "--repeats", 1, "--no-memory", "--out", tmp_path),
    )
    rows = read_csv(tmp_path / "attention_benchmark.csv")
    assert [(r["pattern"], r["implementation"]) for r in rows] == [
        tuple(pair.split(":")) for pair in pairs.split(",")
    ]
    assert all(float(r["seconds"]) > 0 and not r["error"] for r in rows)
    assert all(r["peak_gb"] == "" and r["xla_gb"] == "" for r in rows)  # --no-memory
    assert float(rows[1]["block_fraction"]) < 1.0
    assert (tmp_path / "time.png").exists()
    assert_records_this_machine(rows, stdout)


def test_chunked_benchmark_records_its_machine(tmp_path):
    stdout = run(
        "chunked_benchmark.py",
        *("--lengths=256", "--memory_lengths=256", "--implementations=chunked,xla"),
        *("--repeats=1", "--heads=2", "--head_dim=16", f"--out_dir={tmp_path}"),
    )
    time_rows = read_csv(tmp_path / "chunked_time.csv")
    memory_rows = read_csv(tmp_path / "chunked_memory.csv")
    assert [r["implementation"] for r in time_rows] == ["chunked", "xla"]
    assert all(float(r["seconds"]) > 0 for r in time_rows)
    assert float(memory_rows[0]["peak_gb"]) > 0
    assert_records_this_machine(time_rows + memory_rows, stdout)


def test_decoding_benchmark_records_its_machine(tmp_path):
    stdout = run(
        "decoding_benchmark.py",
        *("--tables", "generation,buffers,memory,uncached", "--lengths", 8, "--buffers", "256"),
        *("--uncached_lengths", 8, "--uncached_steps", 4, "--repeats", 1, "--no-torch"),
        *("--num_layers", 1, "--out", tmp_path),  # one layer: the tables' code, compiled cheaply
    )
    (uncached,) = read_csv(tmp_path / "decoding_uncached.csv")
    assert (uncached["tokens"], uncached["same_tokens"]) == ("8", "4/4")
    generation = read_csv(tmp_path / "decoding_generation.csv")
    assert [r["pattern"] for r in generation] == ["full", "window"]
    assert all(float(r["jax_tokens_per_s"]) > 0 for r in generation)
    (buffers,) = read_csv(tmp_path / "decoding_buffers.csv")
    assert float(buffers["jax_ms_per_token"]) > 0
    memory = {r["pattern"]: r for r in read_csv(tmp_path / "decoding_memory.csv")}
    # 8 tokens: the window's ring holds min(257, 8) slots, as many as full attention's cache.
    assert float(memory["window"]["jax_cache_mb"]) == float(memory["full"]["jax_cache_mb"]) > 0
    assert (tmp_path / "decoding.png").exists()
    rows = generation + [buffers, uncached, *memory.values()]
    assert {r["num_layers"] for r in rows} == {"1"} and "decoder LM: num_layers 1," in stdout
    assert_records_this_machine(rows, stdout)


def test_ring_benchmark_measures_memory_and_bytes_against_the_context_size(tmp_path):
    """A sliding window of 64 over 1,024 tokens on 1, 2 and 4 devices: per-device memory falls
    with the context size, and each ring step sends one window's keys and values whatever the
    number of shards (64 tokens x 2 heads x 16 dims x 4 bytes, keys and values)."""
    stdout = run(
        "ring_benchmark.py",
        *("--length=1024", "--contexts=1,2,4", "--patterns=sliding_window", "--window=64"),
        *("--heads=2", "--head_dim=16", "--repeats=1", f"--out={tmp_path}"),
    )
    rows = read_csv(tmp_path / "ring.csv")
    assert [(r["pattern"], r["context"]) for r in rows] == [
        ("sliding_window(64)", str(context)) for context in (1, 2, 4)
    ]
    memory = [float(r["memory_mb_per_device"]) for r in rows]
    assert memory[0] > memory[1] > memory[2] > 0
    assert [int(r["bytes_per_step_per_device"]) for r in rows] == [0] + [64 * 2 * 16 * 4 * 2] * 2
    # On 4 shards of 256 tokens, each exchanges with its left and right neighbours only.
    assert int(rows[2]["pairs_skipped"]) == 16 - 4 - 2 * 3
    assert all(float(r["step_s"]) > 0 for r in rows)
    assert (tmp_path / "ring.md").exists() and (tmp_path / "ring.png").exists()
    assert_records_this_machine(rows, stdout)


def test_ring_benchmark_trains_a_bigbird_lm_on_one_and_on_two_context_devices(tmp_path):
    stdout = run(
        "ring_benchmark.py",
        *("--train", "--length=512", "--contexts=1,2", "--repeats=1", f"--out={tmp_path}"),
    )
    one, two = read_csv(tmp_path / "train.csv")
    assert (one["context"], one["order"], two["context"], two["order"]) == ("1", "-", "2", "zigzag")
    assert float(one["memory_mb_per_device"]) > float(two["memory_mb_per_device"]) > 0
    assert float(one["layer0_fwd_mb_all"]) == 0 < float(two["layer0_fwd_mb_all"])
    assert float(two["layer0_fwd_bwd_mb_all"]) > float(two["layer0_fwd_mb_all"])
    assert all(float(r["tokens_per_s"]) > 0 for r in (one, two))
    assert (tmp_path / "train.md").exists()
    assert_records_this_machine([one, two], stdout)


def test_peers_without_torch_times_our_side_and_the_ideal_speedups(tmp_path):
    stdout = run(
        "peers.py",
        *("--no-torch", "--lengths", 128, "--sparse-length", 128, "--train-variants", ""),
        *("--repeats", 1, "--out", tmp_path),
    )
    assert "PyTorch is not used (--no-torch): our side only." in stdout
    rows = read_csv(tmp_path / "peers.csv")
    assert [(r["pattern"], r["pass"]) for r in rows] == [
        ("full", "forward+backward"),
        ("causal", "forward+backward"),
        ("sliding_window", "forward+backward"),
        ("sliding_window", "forward"),
        ("bigbird", "forward+backward"),
        ("bigbird", "forward"),
    ]
    assert all(float(r["ours_seconds"]) > 0 and float(r["jax_nn_seconds"]) > 0 for r in rows[:2])
    assert all(r["peer_seconds"] == "" and not r["error"] for r in rows)
    sparse = [r for r in rows if r["pattern"] in ("sliding_window", "bigbird")]
    # At 128 tokens both patterns leave no block empty: their ideal speedup is none.
    assert all(float(r["block_fraction"]) == 1.0 for r in sparse)
    assert all(float(r["fraction_of_ideal"]) > 0 for r in sparse if r["pass"] != "forward")
    assert (tmp_path / "peers.png").exists()
    assert_records_this_machine(rows, stdout)


def test_block_products_gradients_match_autodiff():
    length, heads, dim = 512, 2, 8
    q, k, v = (
        jax.random.normal(key, (1, length, heads, dim))
        for key in jax.random.split(jax.random.key(1), 3)
    )
    _, (layouts, masks) = block_products.make_step(BIGBIRD, q, k, v, 64)
    layout, mask = layouts[0], masks[0]
    weights = jax.random.normal(jax.random.key(2), layout[0].shape)

    def plain(q, k, v):  # autodiff through an unfused softmax
        logits = jnp.where(mask[:, None], jnp.einsum("shiqd,shikd->shiqk", q, k), -jnp.inf)
        return jnp.einsum("shiqk,shikd->shiqd", jax.nn.softmax(logits, axis=-1), v)

    grads = jax.grad(
        lambda *x: (block_products._scheduled_rows(*x, mask) * weights).sum(), argnums=(0, 1, 2)
    )(*layout)
    expected = jax.grad(lambda *x: (plain(*x) * weights).sum(), argnums=(0, 1, 2))(*layout)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_fault_injection_names_its_faults_when_given_an_unknown_one():
    completed = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "fault_injection.py"), "--faults", "meteor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "unknown faults ['meteor']; allowed: sigterm, sigkill, corrupt" in completed.stderr
