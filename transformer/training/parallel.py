"""Parallelism: a device mesh from the config, one per-device step, and sharding rules.

The mesh has named axes (`AXES`): `data` and `fsdp` split the batch between them; `fsdp` also
shards the parameters and the optimizer state (ZeRO-3 style); `context` splits each sequence
(context parallelism: the model's self-attention runs as a ring over it, see
`transformer/attention/ring.py`); `tensor` is a name kept for tensor parallelism and takes size 1
for now. `mesh_shape` turns `config.mesh` into sizes, with start-up errors that name the numbers.

A step is written once, in two parts:
  * the per-device part (`per_device`) sees its device's rows of the batch (and its shard of
    each sequence under context parallelism) and the whole parameters, and combines results
    across devices with collectives (`lax.psum`) over `sum_axes(mode)`. It runs under
    `jax.shard_map` over the mesh (the default), or under `jax.pmap`. Under FSDP the parameters
    reach it gathered (one all-gather per array, which XLA's scheduler is free to place next to
    its use), and the gradient it returns leaves it reduce-scattered back to the parameters'
    shards.
  * the rest of the step (the optimizer update) is written on whole arrays; under `jax.jit` each
    device updates its own shard of the parameters and optimizer state, and reductions over them
    (the global gradient norm) are combined by XLA.
The custom calls of the attention kernels have no sharding rule, which is one reason the model
itself runs per device: inside `shard_map` every call sees one device's rows.

Parameters and optimizer state follow `fsdp_spec`: each array is split over `fsdp` along its
largest dimension that the fsdp size divides, or replicated when none does; nothing is split
over `context`. The batch is split along its first dimension over `data` x `fsdp`, and its arrays
with a length (`[batch, length, ...]`) along the second over `context` (`batch_spec`), in zig-zag
order when the model asks for it (`global_batch`).

Multi-host: call `initialize_distributed` before anything else touches JAX devices. Each host then
feeds only its own rows of the global batch (`local_batch_size`), and `global_batch` assembles
them into one array spread over all hosts' devices.
"""

import os

import jax
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor", "context")
AXIS = "data"  # the one axis of pmap, and of data parallelism
BATCH_AXES = ("data", "fsdp")  # the batch is split over both, data-major
CONTEXT = "context"  # each sequence is split over this axis
# Losses, metrics and gradients are sums over every token of the global batch: over these axes.
SUM_AXES = (*BATCH_AXES, CONTEXT)
# Names kept for parallelism still to come: accepted with size 1 only.
RESERVED_AXES = {"tensor": "tensor parallelism (parameters split within a layer)"}
MODES = ("shard_map", "pmap")


def initialize_distributed(
    coordinator_address=None, num_processes=None, process_id=None, auto=False
):
    """Starts `jax.distributed` when this is a multi-process job; returns the process count.

    With `coordinator_address` given, `num_processes` and `process_id` must be too (processes
    started by hand, e.g. several on one machine). Otherwise JAX's own cluster detection (Cloud
    TPU, SLURM, Open MPI, Kubernetes) runs when `auto` is True or when a SLURM job of several
    tasks or a multi-host TPU slice is recognised from the environment; else this is a single
    process and nothing happens.
    """
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id too.")
        jax.distributed.initialize(
            coordinator_address, num_processes=num_processes, process_id=process_id
        )
    elif auto or _detected_cluster():
        jax.distributed.initialize()
    logging.info(
        "process %d of %d; %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count()


def _detected_cluster():
    """Name of the multi-host environment we run in, or None (then pass auto=True to be sure)."""
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in tpu_hosts.split(",") if h]) > 1:
        return "tpu"
    return None


def enable_cpu_collectives():
    """Lets several CPU processes run collectives (gloo over TCP), for tests on one machine."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


# ---------------------------------------------------------------------------------------------
# The mesh.


def mesh_shape(sizes=None, device_count=None, mode="shard_map"):
    """`config.mesh` ({axis: size}, -1 = the rest of the devices) -> {axis: size} over `AXES`.

    Missing axes are 1, except that with no -1 given `data` takes the rest. Raises ValueError
    naming the field, the numbers and what is allowed.
    """
    device_count = jax.device_count() if device_count is None else device_count
    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"config.mesh has no axis {unknown[0]!r}; allowed: {', '.join(AXES)}.")
    for axis, size in sizes.items():
        if not (isinstance(size, int) and not isinstance(size, bool) and (size > 0 or size == -1)):
            raise ValueError(
                f"config.mesh.{axis}={size!r} is invalid; allowed: a positive integer, or -1 "
                "for the rest of the devices."
            )
    for axis, what in RESERVED_AXES.items():
        if sizes.get(axis, 1) != 1:
            raise ValueError(
                f"config.mesh.{axis}={sizes[axis]}: {what} is not implemented yet; allowed: 1."
            )
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(
            f"config.mesh gives -1 (the rest of the devices) for {' and '.join(rest)}; allowed: "
            f"-1 for one axis at most: give the others sizes, e.g. config.mesh.{rest[0]}=1."
        )
    if not rest and "data" not in sizes:
        sizes["data"], rest = -1, ["data"]
    shape = {axis: sizes.get(axis, 1) for axis in AXES}
    fixed = int(np.prod([size for size in shape.values() if size != -1]))
    described = " x ".join(f"{a}={s}" for a, s in shape.items() if s != 1)
    if (rest and device_count % fixed) or (not rest and fixed != device_count):
        sizes_named = "its sizes other than -1" if rest else "its sizes"
        allowed = "a product that divides" if rest else "a product equal to"
        raise ValueError(
            f"config.mesh ({described or 'all sizes 1'}) does not fit {device_count} devices: "
            f"{sizes_named} multiply to {fixed}; allowed: {allowed} {device_count}."
        )
    if rest:
        shape[rest[0]] = device_count // fixed
    for axis in ("fsdp", CONTEXT):
        if mode == "pmap" and shape[axis] > 1:
            raise ValueError(
                f"config.parallel='pmap' runs data parallelism only, but config.mesh.{axis}="
                f"{shape[axis]}; allowed: {axis}=1 with pmap, or config.parallel='shard_map'."
            )
    return shape


def make_mesh(sizes=None, devices=None):
    """A mesh with axes `AXES` over `devices` (default: every device of every host).

    `sizes` is `config.mesh` (see `mesh_shape`); None puts every device on `data`.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(tuple(shape.values()), AXES, devices=devices)


def batch_axes(mode):
    """The axes the batch's rows are split over, as the per-device step names them."""
    return (AXIS,) if mode == "pmap" else BATCH_AXES


def sum_axes(mode):
    """The axes the per-device step sums its losses, metrics and gradients over: those of the
    rows and of the sequence shards."""
    return (AXIS,) if mode == "pmap" else SUM_AXES


def context_size(mesh):
    """How many shards each sequence is split into on `mesh` (1 without context parallelism)."""
    return dict(mesh.shape).get(CONTEXT, 1)


def batch_spec(x, mesh):
    """The PartitionSpec of a batch array: rows over the batch axes; with context parallelism,
    `[batch, length, ...]` arrays also split along the length over "context"."""
    if np.ndim(x) >= 2 and context_size(mesh) > 1:
        return P(BATCH_AXES, CONTEXT)
    return P(BATCH_AXES)


def local_batch_size(global_batch_size, shape=None):
    """Rows of the global batch this host reads; a clear error when they cannot be split evenly
    over the batch axes (`shape` from `mesh_shape`; None: all devices on `data`)."""
    shape = mesh_shape() if shape is None else shape
    shards, hosts = shape["data"] * shape["fsdp"], jax.process_count()
    if global_batch_size % shards or global_batch_size % hosts:
        split = f"data={shape['data']} x fsdp={shape['fsdp']}"
        raise ValueError(
            f"global_batch_size={global_batch_size} does not divide across {shards} batch "
            f"shards ({split}; {jax.device_count()} devices on {hosts} hosts); use a multiple "
            f"of {np.lcm(shards, hosts)}."
        )
    return global_batch_size // hosts


# ---------------------------------------------------------------------------------------------
# Sharding rules.


def fsdp_spec(shape, fsdp):
    """The PartitionSpec of an array of `shape` under FSDP of size `fsdp`: its largest dimension
    that `fsdp` divides is split over "fsdp" (the first of equals), or none: replicated."""
    if fsdp == 1:
        return P()
    divisible = [(size, -dim) for dim, size in enumerate(shape) if size % fsdp == 0]
    if not divisible:
        return P()
    dim = -max(divisible)[1]
    return P(*(["fsdp" if d == dim else None for d in range(len(shape))]))


def fsdp_specs(tree, mesh):
    """`fsdp_spec` of every array of `tree` (arrays or anything with a `.shape`)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: fsdp_spec(np.shape(x), fsdp), tree)


def shardings(specs, mesh):
    """PartitionSpecs -> NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
    )


def constrain(tree, specs, mesh, mode):
    """Inside a jitted step: `tree` laid out as `specs` (no-op under pmap, and where the layout
    is that already)."""
    if mode == "pmap":
        return tree
    return jax.sharding.reshard(tree, shardings(specs, mesh))


# ---------------------------------------------------------------------------------------------
# Running the per-device part of a step.


def _gather(params, specs):
    """Per device: sharded parameters -> whole ones (all-gather over "fsdp")."""

    def gather(x, spec):
        if "fsdp" not in spec:
            return x
        return lax.all_gather(x, "fsdp", axis=list(spec).index("fsdp"), tiled=True)

    return jax.tree.map(gather, params, specs, is_leaf=lambda x: isinstance(x, P))


def _sum_gradients(grads, specs, axes):
    """Per device: this device's share of the gradient -> the sum over `axes` (the batch and
    sequence axes), on the parameters' shards (a reduce-scatter over "fsdp" for sharded ones)."""

    def reduce(g, spec):
        if "fsdp" not in spec:
            return lax.psum(g, axes)
        g = lax.psum_scatter(g, "fsdp", scatter_dimension=list(spec).index("fsdp"), tiled=True)
        return lax.psum(g, tuple(a for a in axes if a != "fsdp"))

    return jax.tree.map(reduce, grads, specs, is_leaf=lambda x: isinstance(x, P))


def per_device(fn, mesh, mode, *, gradients=False):
    """Global view -> per device: `run(params, batch, rest)` calls `fn(params, batch, rest)` on
    every device with the whole `params`, this device's rows of `batch` (a pytree of arrays
    `[batch, ...]`; of those with a length, this device's shard of it under context
    parallelism, `batch_spec`) and `rest` (replicated).

    `fn`'s outputs must be combined over `sum_axes(mode)` already (replicated), except, with
    `gradients=True`, the first of its two outputs: this device's share of the gradient of the
    parameters, which `run` sums over the batch and the sequence shards and returns laid out as
    the parameters are. Under pmap (called inside `distribute`'s pmap) `run` is `fn`, plus the
    psum of gradients.
    """
    axes = sum_axes(mode)
    if mode == "pmap":

        def run_pmap(params, batch, rest):
            out = fn(params, batch, rest)
            return (lax.psum(out[0], axes), out[1]) if gradients else out

        return run_pmap

    def run(params, batch, rest):
        specs = fsdp_specs(params, mesh)

        def body(params, batch, rest):
            out = fn(_gather(params, specs), batch, rest)
            return (_sum_gradients(out[0], specs, axes), out[1]) if gradients else out

        batch_specs = jax.tree.map(lambda x: batch_spec(x, mesh), batch)
        mapped = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(specs, batch_specs, P()),
            out_specs=(specs, P()) if gradients else P(),
            check_vma=False,
        )
        return mapped(params, batch, rest)

    return run


def distribute(step_fn, mode, mesh, donate_state=False):
    """Compiles `step_fn(state, batch)`, written on whole arrays with its per-device part in
    `per_device`, for `mode`: `jax.jit` (shard_map) or `jax.pmap` (the whole step per device).

    Takes what `place` and `global_batch` produce. Every output of the pmap'ed step must be
    replicated.
    """
    if mode == "shard_map":
        return jax.jit(step_fn, donate_argnums=(0,) if donate_state else ())
    if mode == "pmap":
        # pmap gives each device a leading-axis slice; out_axes=None returns the (replicated)
        # result once.
        mapped = jax.pmap(
            step_fn,
            axis_name=AXIS,
            in_axes=(None, 0),
            out_axes=None,
            devices=mesh.devices.flatten().tolist(),
        )
        local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        return lambda state, batch: mapped(state, _split_for_pmap(batch, local_devices))
    raise ValueError(f"unknown parallel mode {mode!r}; allowed: {', '.join(MODES)}.")


def _split_for_pmap(batch, n):
    """[local_batch, ...] -> [n local devices, local_batch / n, ...]."""
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


# ---------------------------------------------------------------------------------------------
# Moving arrays between the host and the mesh.


def place(tree, specs, mesh, mode):
    """Places a host-local pytree, equal on every host, on the mesh, laid out as `specs`
    (a pytree of PartitionSpecs, or one for all). Under pmap the tree stays on the host: pmap
    broadcasts its in_axes=None arguments itself."""
    if mode == "pmap":
        return tree
    if isinstance(specs, P):
        specs = jax.tree.map(lambda _: specs, tree)
    return jax.tree.map(
        lambda x, sharding: jax.make_array_from_callback(
            np.shape(x), sharding, lambda index: np.asarray(x)[index]
        ),
        tree,
        shardings(specs, mesh),
    )


def replicate(tree, mesh, mode):
    """Places a host-local pytree, equal on every host, on all devices (replicated)."""
    return place(tree, P(), mesh, mode)


def global_batch(local_batch, mesh, mode, order="contiguous"):
    """This host's rows `[local_batch, ...]` -> the batch the distributed step takes.

    Under shard_map that is one global array `[global_batch, ...]` per field, laid out by
    `batch_spec` over all hosts' devices; under pmap it stays host-local (pmap splits it over
    the local devices). With context parallelism and `order="zigzag"` the arrays with a length
    are put in zig-zag order first (`ring.to_zigzag`, on the host), as the model's ring expects.
    """
    if mode == "pmap":
        return local_batch
    local_batch = jax.tree.map(np.asarray, local_batch)
    shards = context_size(mesh)
    if shards > 1:
        local_batch = jax.tree.map(lambda x: in_context_order(x, shards, order), local_batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            NamedSharding(mesh, batch_spec(x, mesh)), x
        ),
        local_batch,
    )


def check_context_length(x, shards, order):
    """A ValueError naming the numbers unless `x`, `[batch, length, ...]`, has a length that
    splits into `shards` sequence shards (2 x shards zig-zag chunks); arrays without a length
    pass."""
    if np.ndim(x) < 2:
        return
    length = np.shape(x)[1]
    chunks = 2 * shards if order == "zigzag" else shards
    if length % chunks:
        what = f"2 x {shards} zig-zag chunks" if order == "zigzag" else f"{shards} shards"
        raise ValueError(
            f"sequences of length {length} do not divide into {what} (config.mesh.context="
            f"{shards}{', zig-zag order for a causal model' if order == 'zigzag' else ''}); "
            f"allowed: a length that is a multiple of {chunks}, e.g. {-(-length // chunks) * chunks}."
        )


def in_context_order(x, shards, order):
    """`[batch, length, ...]` -> the same in `order` over `shards` sequence shards (arrays
    without a length as they are)."""
    check_context_length(x, shards, order)
    if np.ndim(x) < 2 or order != "zigzag":
        return x
    from transformer.attention import ring

    return np.asarray(x)[:, ring.zigzag_permutation(np.shape(x)[1], shards)]


def fetch(tree):
    """Device arrays -> whole NumPy arrays on this host, however they are sharded (a collective
    across hosts for arrays split over several; safe on multi-host, unlike np.asarray)."""

    def whole(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if x.is_fully_addressable:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(whole, tree)
