"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the environment.

Every binary calls :func:`initialize_from_flags` before touching devices. With no settings and no
cluster environment (TPU pod, SLURM) it does nothing: a single process.
"""

from __future__ import annotations

import os

import jax
from absl import flags, logging

_DEFINED = False


def define_flags():
  global _DEFINED
  if _DEFINED:
    return
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Total number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.DEFINE_bool(
    "distributed_auto", False,
    "Call jax.distributed.initialize() with no arguments (auto-detect on TPU pods / SLURM).",
  )
  flags.DEFINE_integer(
    "local_device_count", None, "Simulated CPU devices for this process (testing on CPU)."
  )
  _DEFINED = True


def initialize(
  coordinator_address: str | None = None, num_processes: int | None = None,
  process_id: int | None = None, auto: bool = False, local_device_count: int | None = None,
):
  """Initializes JAX's multi-controller runtime when asked to; returns whether it did."""
  if local_device_count:
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise ValueError(
        "multi-process runs need all of --coordinator_address, --num_processes and --process_id "
        f"(got {given}); or pass --distributed_auto on a TPU pod / SLURM cluster."
      )
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}).")
    # CPU processes exchange collectives over gloo; accelerators use their own transport.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif auto or os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def initialize_from_flags():
  f = flags.FLAGS
  return initialize(
    f.coordinator_address, f.num_processes, f.process_id, f.distributed_auto,
    f.local_device_count,
  )
