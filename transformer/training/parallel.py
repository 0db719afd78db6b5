"""Data parallelism: one per-device step, run over every device of every host.

A step is written once, pmap-style: it sees its device's share of the batch and combines results
across devices with collectives (`lax.psum`, `lax.pmean`) over the axis named `AXIS`. `distribute`
runs it either with `jax.jit` + `jax.shard_map` over a mesh of all devices (the default) or with
`jax.pmap`. In both, the state (parameters, optimizer state) is replicated and the batch is split
along its first dimension.

Multi-host: call `initialize_distributed` before anything else touches JAX devices. Each host then
feeds only its own rows of the global batch (`local_batch_size`), and `global_batch` assembles
them into one array spread over all hosts' devices.
"""

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
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


def make_mesh(devices=None):
    """A 1-D mesh over `devices` (default: every device of every host), axis `AXIS`."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (AXIS,), devices=devices)


def local_batch_size(global_batch_size):
    """Rows of the global batch this host reads; a clear error when they cannot be split evenly."""
    devices, hosts = jax.device_count(), jax.process_count()
    if global_batch_size % devices:
        raise ValueError(
            f"global_batch_size={global_batch_size} does not divide across {devices} devices "
            f"({hosts} hosts x {jax.local_device_count()}); use a multiple of {devices}."
        )
    return global_batch_size // hosts


def distribute(per_device_fn, mode, mesh, donate_state=False):
    """Runs `per_device_fn(state, batch, *replicated)` data-parallel over `mesh`.

    `state` and the extra arguments are replicated, `batch` (a pytree of arrays with the batch as
    first dimension) is split across devices. Every output must be replicated, i.e. already
    combined across devices with collectives over `AXIS`.

    Returns a function of the same arguments taking what `replicate` and `global_batch` produce.
    """
    if mode == "shard_map":
        mapped = jax.shard_map(
            per_device_fn, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(), check_vma=False
        )
        fn = jax.jit(
            lambda state, batch, *rest: mapped(state, batch, rest),
            donate_argnums=(0,) if donate_state else (),
        )
        return fn
    if mode == "pmap":
        # pmap gives each device a leading-axis slice; out_axes=None returns the (replicated)
        # result once. The rest-arguments travel as one broadcast tuple.
        mapped = jax.pmap(
            lambda state, batch, rest: per_device_fn(state, batch, rest),
            axis_name=AXIS,
            in_axes=(None, 0, None),
            out_axes=None,
            devices=mesh.devices.flatten().tolist(),
        )
        local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        return lambda state, batch, *rest: mapped(
            state, _split_for_pmap(batch, local_devices), rest
        )
    raise ValueError(f"unknown parallel mode {mode!r}; allowed: {', '.join(MODES)}.")


def _split_for_pmap(batch, n):
    """[local_batch, ...] -> [n local devices, local_batch / n, ...]."""
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def replicate(tree, mesh, mode):
    """Places a host-local pytree, equal on every host, on all devices (replicated)."""
    if mode == "pmap":
        return tree  # pmap broadcasts its in_axes=None arguments itself.
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            np.shape(x), sharding, lambda index: np.asarray(x)[index]
        ),
        tree,
    )


def global_batch(local_batch, mesh, mode):
    """This host's rows `[local_batch, ...]` -> the batch the distributed step takes.

    Under shard_map that is one global array `[global_batch, ...]` split over all devices of all
    hosts; under pmap it stays host-local (pmap splits it over the local devices).
    """
    if mode == "pmap":
        return local_batch
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def fetch(tree):
    """Replicated device arrays -> NumPy on this host (safe on multi-host, unlike np.asarray)."""
    return jax.tree.map(
        lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
        tree,
    )
