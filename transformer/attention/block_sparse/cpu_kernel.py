"""The fused CPU kernels (`cpu_kernel.cc`), built at first use: block-sparse attention, and one
cached decoding step (`decode_step`, which `transformer.modules.kv_cache` uses on CPU).

XLA runs block-sparse attention as gathers, small batched matmuls and element-wise passes, each a
separate pass over memory; on CPU its 64-row matmuls reach about a quarter of the large-matmul
FLOP rate. The kernel instead walks each (batch * head, query block) row's key blocks with the
scores, softmax and products of a chunk of blocks in cache, and reads key and value blocks in
place, by index.

The C++ source ships with the package and is compiled once per machine with the system's C++
compiler (`c++ -O3 -march=native`) into a cache directory (`$TRANSFORMER_KERNEL_CACHE`, by default
`~/.cache/transformer-attention`), keyed by the source, the JAX version and the CPU. Without a
compiler, `block_sparse` falls back to its XLA schedules, with the same results; `unavailable()`
says why.

Loading a shared library runs its code, and the library's name is predictable, so the cache is
trusted only as far as this process can vouch for it: the directory (created with mode 0o700)
must be a real directory, not a symlink, owned by the current user and not writable by group or
others; the library must be a regular file, not a symlink, owned by the user, and its SHA-256
must equal the digest written next to it (`<library>.sha256`) when this user built it (a library
with no digest is rebuilt). A cache that fails a check is never loaded: `unavailable()` gives the
reason (warned about), and block_sparse uses its XLA schedules. So does a library that lacks the
kernel's symbols.
"""

import ctypes
import functools
import hashlib
import os
import platform
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from transformer.attention.shapes import varying_like
from transformer.attention.sinks import sink_gradient, with_sinks

_SOURCE = Path(__file__).with_name("cpu_kernel.cc")
# FFI target names, suffixed with the kernel's version (`_target`).
_FORWARD, _BACKWARD = "transformer_block_sparse_forward", "transformer_block_sparse_backward"
_DECODE = "transformer_decode_step"
# Key blocks and head dims must be multiples of 16 floats: a whole number of the kernel's vectors
# at every machine's width (16 floats with AVX-512, 8 with AVX2, 4 otherwise), so every machine
# takes the kernel for the same inputs.
LANES = 16


def _cpu_signature():
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _cache_dir():
    default = Path.home() / ".cache" / "transformer-attention"
    return Path(os.environ.get("TRANSFORMER_KERNEL_CACHE", default))


class UntrustedCache(RuntimeError):
    """The kernel cache or a library in it fails a check: it is not loaded."""


def _check_private_directory(directory):
    """Raises UntrustedCache unless `directory` is a real directory that only this user can
    write to (others could plant a library there)."""
    try:
        info = os.lstat(directory)
    except OSError as error:
        raise UntrustedCache(f"cannot inspect kernel cache {directory}: {error}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UntrustedCache(f"kernel cache {directory} is a symlink or not a directory")
    if info.st_uid != os.geteuid():
        raise UntrustedCache(f"kernel cache {directory} is owned by another user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedCache(
            f"kernel cache {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); `chmod go-w` it or choose another "
            "$TRANSFORMER_KERNEL_CACHE"
        )


def _private_cache_dir():
    """The cache directory, created with mode 0o700 if missing, after its checks."""
    directory = _cache_dir()
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as error:
        raise UntrustedCache(f"cannot create kernel cache {directory}: {error}") from None
    _check_private_directory(directory)
    return directory


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _digest_file(library):
    return library.with_name(library.name + ".sha256")


def _check_library(library):
    """Raises UntrustedCache unless `library` is this user's regular file, with the digest
    recorded when it was built."""
    info = os.lstat(library)
    if not stat.S_ISREG(info.st_mode):
        raise UntrustedCache(f"kernel library {library} is a symlink or not a regular file")
    if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedCache(
            f"kernel library {library} is owned by another user or writable by others"
        )
    digest = _digest_file(library)
    try:
        digest_info = os.lstat(digest)
        if not stat.S_ISREG(digest_info.st_mode) or digest_info.st_uid != os.geteuid():
            raise UntrustedCache(f"kernel digest {digest} is not this user's regular file")
        recorded = digest.read_text().strip()
    except FileNotFoundError:
        raise UntrustedCache(
            f"kernel library {library} has no recorded digest ({digest.name})"
        ) from None
    if _sha256(library) != recorded:
        raise UntrustedCache(
            f"kernel library {library} does not match the digest recorded when it was built"
        )


def _compile(library):
    compiler = os.environ.get("CXX", "c++")
    command = [
        compiler,
        "-O3",
        "-march=native",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-isystem",
        jax.ffi.include_dir(),
        str(_SOURCE),
        "-o",
    ]
    # Compile to a temporary name, then rename: concurrent processes never load a partial file.
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = Path(tmp) / library.name
        try:
            result = subprocess.run(command + [str(partial)], capture_output=True, text=True)
        except FileNotFoundError:
            raise RuntimeError(
                f"no C++ compiler '{compiler}' (install g++, e.g. "
                "`apt-get install g++`, or set CXX)"
            ) from None
        if result.returncode:
            raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{result.stderr[-2000:]}")
        # The digest first, both atomically: a library is never in place without its digest,
        # and a reader sees a whole digest or none.
        digest = Path(tmp) / "digest"
        digest.write_text(_sha256(partial) + "\n")
        os.replace(digest, _digest_file(library))
        os.replace(partial, library)


@functools.lru_cache(maxsize=1)
def _version():
    """What the compiled library depends on: the source, the JAX version and the CPU."""
    return hashlib.sha256(
        _SOURCE.read_bytes() + jax.__version__.encode() + _cpu_signature().encode()
    ).hexdigest()[:16]


def _target(prefix):
    """The FFI target name of this version: an executable from JAX's persistent compilation cache
    built against another version of the kernel then finds no handler, rather than a wrong one."""
    return f"{prefix}_{_version()}"


def _build():
    """The kernel's shared library, compiled into the cache unless it is there already, and
    checked (`_check_library`) before anyone loads it."""
    library = _private_cache_dir() / f"block_sparse_cpu-{_version()}.so"
    # A library without a digest (built before digests were recorded) is rebuilt, never loaded.
    if not os.path.lexists(library) or not os.path.lexists(_digest_file(library)):
        _compile(library)
    _check_library(library)
    return library


# XLA keeps the first handler registered under a name for the life of the process.
_registered = set()


@functools.lru_cache(maxsize=1)
def _load():
    """Builds (once per machine) and registers the kernel; returns None or why it is unavailable."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        handlers = (
            (_FORWARD, lib.BlockSparseForward),
            (_BACKWARD, lib.BlockSparseBackward),
            (_DECODE, lib.DecodeStep),
        )
    except (RuntimeError, OSError) as error:
        return f"the fused CPU kernel is unavailable: {error}"
    except AttributeError as error:
        return f"the fused CPU kernel is unavailable: its library lacks a symbol ({error})"
    for prefix, handler in handlers:
        if _target(prefix) not in _registered:
            jax.ffi.register_ffi_target(_target(prefix), jax.ffi.pycapsule(handler), platform="cpu")
            _registered.add(_target(prefix))
    return None


@functools.lru_cache(maxsize=1)
def unavailable():
    """None when the kernel is built and registered, else the reason (warned about once)."""
    # Read once per process, like the build: set it before the first block-sparse call.
    if os.environ.get("TRANSFORMER_CPU_KERNEL", "1") == "0":
        return "disabled by TRANSFORMER_CPU_KERNEL=0"
    reason = _load()
    if reason:
        warnings.warn(
            f"{reason}; block_sparse uses its XLA schedules on CPU (the same maths, slower)",
            stacklevel=3,
        )
    return reason


def supports(block_kv, head_dim, value_dim, dtype, alibi_slopes):
    """Whether the kernel computes this case; the rest goes to block_sparse's XLA schedules.

    dtype: the inputs'; block-sparse computes in it promoted to at least float32.
    """
    return (
        jax.default_backend() == "cpu"
        and alibi_slopes is None
        and jnp.promote_types(dtype, jnp.float32) == jnp.float32
        and block_kv % LANES == 0
        and head_dim % LANES == 0
        and value_dim % LANES == 0
        and unavailable() is None
    )


def supports_decode(dtype, head_dim, value_dim):
    """Whether `decode_step` computes a cache of this dtype and head sizes on this backend."""
    return (
        jax.default_backend() == "cpu"
        and jnp.dtype(dtype) == jnp.float32
        and head_dim % LANES == 0
        and value_dim % LANES == 0
        and unavailable() is None
    )


def _per_head_or_empty(x):
    """`[heads]` float32, or an empty array for None (the kernel's "none")."""
    return jnp.zeros((0,), jnp.float32) if x is None else jnp.asarray(x, jnp.float32)


def _cap_attribute(logit_soft_cap):
    """The kernel's soft_cap attribute: c, or 0 for no cap."""
    return np.float32(0.0 if logit_soft_cap is None else logit_soft_cap)


def decode_step(
    query,
    key,
    value,
    key_cache,
    value_cache,
    positions,
    alibi_slopes=None,
    *,
    ring=False,
    logit_soft_cap=None,
    sinks=None,
):
    """One cached decoding step: writes each row's key and value at its position, then attends
    over keys 0..position, reading no key past it; with `ring`, the caches are a ring of
    `slots` = window + 1 positions (slot p % slots), written in order, and a step attends over
    the window.

    query: `[batch, heads, head_dim]` (unscaled); key: `[batch, kv_heads, head_dim]`; value:
    `[batch, kv_heads, value_dim]`; key_cache / value_cache: `[batch, kv_heads, slots, head_dim
    or value_dim]`, updated in place (XLA aliases them to the results), kv_heads dividing heads
    (query head h reads key/value head h // (heads // kv_heads)); positions: `[batch]` int32; alibi_slopes: `[heads]` or
    None; logit_soft_cap: c or None (q.k / sqrt(head_dim) becomes c * tanh(. / c) before ALiBi);
    sinks: `[heads]` sink logits or None. Returns (output `[batch, heads, value_dim]`,
    key_cache, value_cache). Not differentiable: decoding only.
    """
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    if query.shape[1] % key_cache.shape[1] or key.shape != key_cache.shape[:2] + key.shape[2:]:
        raise ValueError(
            f"decode_step: query {query.shape}, key {key.shape} and key_cache "
            f"{key_cache.shape} need [batch, heads, d], [batch, kv_heads, d] and "
            "[batch, kv_heads, slots, d] with kv_heads dividing heads."
        )
    shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    return jax.ffi.ffi_call(
        _target(_DECODE),
        (
            jax.ShapeDtypeStruct(query.shape[:2] + value.shape[2:], value.dtype),
            shape(key_cache),
            shape(value_cache),
        ),
        input_output_aliases={3: 1, 4: 2},
        vmap_method="sequential",
    )(
        query * query.shape[-1] ** -0.5,
        key,
        value,
        key_cache,
        value_cache,
        jnp.asarray(positions, jnp.int32),
        _per_head_or_empty(alibi_slopes),
        _per_head_or_empty(sinks),
        ring=np.int64(ring),
        soft_cap=_cap_attribute(logit_soft_cap),
    )


def _merge_batch_heads(x):
    """`[batch, heads, ...]` -> `[batch * heads, ...]`, the kernel's leading axis."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _layout_args(layout, masks, key_bias, segments):
    rows, row_start, kv_block, mask_id = (jnp.asarray(x, jnp.int32) for x in layout)
    bias = jnp.zeros((0,), jnp.float32) if key_bias is None else key_bias
    none = jnp.zeros((0,), jnp.int32)
    q_ids, kv_ids = (none, none) if segments is None else segments
    return rows, row_start, kv_block, mask_id, jnp.asarray(masks, jnp.uint8), bias, q_ids, kv_ids


def forward(q, k, v, layout, masks, key_bias, logit_soft_cap=None, segments=None):
    """Output `[batch, heads, num_q_blocks, block_q, dv]` and log-sum-exp `[.., block_q]` of the
    rows in `layout` (zero and +inf elsewhere), scores soft-capped when `logit_soft_cap` is a
    float.

    q: `[batch, heads, num_q_blocks, block_q, d]`, scaled; k, v: `[batch, heads, num_kv_blocks,
    block_kv, d or dv]`; layout: NumPy (rows, row_start, kv_block, mask_id), the non-empty blocks
    of each scheduled row in CSR form; masks: `[num_masks, block_q, block_kv]` bool;
    key_bias: `[batch, num_kv_blocks, block_kv]` (0 or -inf) or None; segments: None or int32
    (q `[batch, num_q_blocks, block_q]`, kv `[batch, num_kv_blocks, block_kv]`) segment ids, a
    query seeing a key only when their ids are equal (the kernel skips the blocks of a batch row
    whose id ranges are disjoint).
    """
    flat = _merge_batch_heads
    rows = q.shape[:4]
    out, lse = jax.ffi.ffi_call(
        _target(_FORWARD),
        (jax.ShapeDtypeStruct(rows + v.shape[-1:], q.dtype), jax.ShapeDtypeStruct(rows, q.dtype)),
        vmap_method="sequential",
    )(
        flat(q),
        flat(k),
        flat(v),
        *_layout_args(layout, masks, key_bias, segments),
        heads=np.int64(q.shape[1]),
        soft_cap=_cap_attribute(logit_soft_cap),
    )
    # Inside `jax.shard_map` an FFI call's results are typed replicated; they vary like its inputs.
    return varying_like((q, k, v, key_bias, *(segments or ())), out, lse)


def backward(
    q, k, v, lse, delta, d_out, layout, masks, key_bias, logit_soft_cap=None, segments=None
):
    """dq, dk, dv of `forward`'s rows: shapes of q, k and v; lse, delta `[.., block_q]`."""
    flat = _merge_batch_heads
    shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    grads = jax.ffi.ffi_call(
        _target(_BACKWARD), (shape(q), shape(k), shape(v)), vmap_method="sequential"
    )(
        flat(q),
        flat(k),
        flat(v),
        flat(d_out),
        flat(lse),
        flat(delta),
        *_layout_args(layout, masks, key_bias, segments),
        heads=np.int64(q.shape[1]),
        soft_cap=_cap_attribute(logit_soft_cap),
    )
    return varying_like((q, k, v, lse, delta, d_out, key_bias, *(segments or ())), *grads)


@functools.lru_cache(maxsize=32)
def attention_fn(plan, logit_soft_cap=None):
    """Like `xla_schedules.attention_fn`, with the fused CPU kernel for every row:
    `attention(q, k, v, key_bias, segments, sinks)`, segments None or the (q, kv) ids of
    `forward`, sinks `[heads]` or None.

    The sinks change each row's normaliser only, so they are added to the kernel's output and
    log-sum-exp here (`sinks.with_sinks`); the kernel's backward pass, given that log-sum-exp
    and dO . O, computes dq, dk and dv as without sinks, and d sinks is computed here.
    """
    layout, masks = plan.row_blocks, plan.block_masks

    def forward_with_sinks(q, k, v, key_bias, segments, sinks):
        out, lse = forward(q, k, v, layout, masks, key_bias, logit_soft_cap, segments)
        if sinks is not None:
            out, lse = with_sinks(out, lse, sinks)
        return out, lse

    @jax.custom_vjp
    def attention(q, k, v, key_bias, segments, sinks):
        return forward_with_sinks(q, k, v, key_bias, segments, sinks)[0]

    def attention_forward(q, k, v, key_bias, segments, sinks):
        out, lse = forward_with_sinks(q, k, v, key_bias, segments, sinks)
        return out, (q, k, v, key_bias, segments, sinks, out, lse)

    def attention_backward(residuals, d_out):
        q, k, v, key_bias, segments, sinks, out, lse = residuals
        delta = jnp.einsum("bhiqd,bhiqd->bhiq", d_out, out)
        dq, dk, dv = backward(
            q, k, v, lse, delta, d_out, layout, masks, key_bias, logit_soft_cap, segments
        )
        d_sinks = None if sinks is None else sink_gradient(sinks, lse, delta)
        d_bias = None if key_bias is None else jnp.zeros_like(key_bias)
        return dq, dk, dv, d_bias, None, d_sinks

    attention.defvjp(attention_forward, attention_backward)
    return attention
