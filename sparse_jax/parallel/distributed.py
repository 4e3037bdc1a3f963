"""Taking part in a multi-process run: joining JAX's distributed runtime and feeding it data.

A run of N processes trains one model over the devices of all of them. Each process calls
:func:`initialize` before touching a device (explicit coordinator address, process count and
index, or the cluster environment that ``jax.distributed.initialize`` reads by itself on TPU
pods, SLURM and similar), reads only its own rows of each global batch
(:func:`process_rows` gives the ``shard_index`` / ``shard_count`` for
``sparse_jax.data.pipeline.train_iterator``), and :func:`global_batch` assembles the
processes' rows into one global ``jax.Array``. In a single process the same calls reduce to a plain
``device_put``.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

log = logging.getLogger(__name__)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    from_environment: bool = False,
) -> bool:
    """Joins a multi-process run; does nothing (returns False) when given nothing.

    Args:
      coordinator: ``host:port`` of process 0's coordination service.
      num_processes: N, processes in the run.
      process_id: this process's index in ``[0, N)``.
      from_environment: let ``jax.distributed.initialize`` find the coordinator, N and the
        index by itself (TPU pod slices, SLURM, Open MPI, Kubernetes).

    Returns:
      Whether the distributed runtime was started.

    Raises:
      ValueError: a partial or contradictory set of arguments.
    """
    explicit = (coordinator, num_processes, process_id)
    if from_environment:
        if any(v is not None for v in explicit):
            raise ValueError(
                "give either the cluster environment (--distributed) or --coordinator, "
                "--num-processes and --process-id, not both"
            )
        _use_gloo_on_cpu()
        jax.distributed.initialize()
        return True
    if all(v is None for v in explicit):
        return False
    if any(v is None for v in explicit):
        raise ValueError(
            "--coordinator, --num-processes and --process-id must be given together (got "
            f"coordinator={coordinator!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r})"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator {coordinator!r} must look like HOST:PORT")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id {process_id} must be in [0, --num-processes={num_processes})"
        )
    _use_gloo_on_cpu()
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True


def _use_gloo_on_cpu() -> None:
    # CPU devices of different processes talk through gloo; GPU and TPU ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_primary() -> bool:
    """True in process 0, the one that writes logs, metrics and shared files."""
    return jax.process_index() == 0


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """This process's block of rows of an array laid out by ``sharding``.

    Returns:
      ``(shard_index, shard_count)``: the process holds rows ``shard_index * n`` up to
      ``(shard_index + 1) * n`` with ``n = global_shape[0] / shard_count``. Processes that hold
      the same rows (a batch replicated over an axis that spans processes) get the same index.

    Raises:
      ValueError: the process's devices hold rows that are not one contiguous block.
    """
    total = global_shape[0]
    blocks = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows = index[0] if index else slice(None)
        blocks.add(range(total)[rows])
    held = sorted({r for block in blocks for r in block})
    start, size = held[0], len(held)
    if held != list(range(start, start + size)) or total % size or start % size:
        raise ValueError(
            f"process {jax.process_index()} holds rows {held[:4]}... of {total}: not one "
            "aligned contiguous block; use a mesh whose batch axes keep each process's devices "
            "together (sparse_jax.parallel.sharding.make_mesh does)"
        )
    return start // size, total // size


def global_batch(
    local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int
) -> dict[str, jax.Array]:
    """Global [batch_size, ...] arrays from each process's rows (see :func:`process_rows`)."""
    return {
        key: jax.make_array_from_process_local_data(sharding, rows, (batch_size, *rows.shape[1:]))
        for key, rows in local.items()
    }


def broadcast_bytes(data: bytes | None) -> bytes:
    """Process 0's ``data`` in every process (other processes may pass None)."""
    if jax.process_count() == 1:
        if data is None:
            raise ValueError("broadcast_bytes: process 0 must pass the data")
        return data
    primary = is_primary()
    size = multihost_utils.broadcast_one_to_all(np.int32(len(data) if primary else 0))
    buffer = np.zeros(int(size), np.uint8)
    if primary:
        buffer[:] = np.frombuffer(data, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier called ``name``."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def describe() -> dict[str, Any]:
    """Process index and count, and local and global device counts, for the run log."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
    }
