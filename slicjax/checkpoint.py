"""The one place that touches orbax: save/restore the train state and the data iterator position.

A checkpoint step holds two items:

* ``state`` — the :class:`~slicjax.train_state.TrainState` (params, optimizer state, step, RNG),
  restored directly into the shardings of an abstract target (so each process reads its shards);
* ``data`` — the data iterator's position (JSON), so a resumed run sees the next unseen example.

Restoring walks back from the newest step: a newest checkpoint that fails to restore (truncated
file, missing entry) is reported with a warning naming it and the step used instead.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def _encode_iter_state(state: Any) -> dict[str, Any]:
  if state is None:
    return {"kind": "none"}
  if isinstance(state, bytes):
    return {"kind": "bytes", "value": base64.b64encode(state).decode("ascii")}
  return {"kind": "json", "value": state}


def _decode_iter_state(d: dict[str, Any]) -> Any:
  kind = d.get("kind")
  if kind == "bytes":
    return base64.b64decode(d["value"])
  if kind == "json":
    return d["value"]
  return None


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored."""


class Checkpointer:
  """Saves every ``every`` steps and at the end, keeps the newest ``keep``, restores the newest good.

  Args:
    directory: where step directories live (created if missing).
    every: save interval in steps (``save`` with ``force=True`` ignores it).
    keep: how many checkpoints to keep.
    async_save: write in a background thread (orbax async checkpointing).
  """

  def __init__(self, directory: str, *, every: int = 1000, keep: int = 3, async_save: bool = False):
    self.directory = os.path.abspath(directory)
    self.every = max(int(every), 1)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data")
    )

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, iterator_state: Any = None, *, force: bool = False) -> bool:
    """Saves if ``step`` is on the interval (or ``force``). Returns whether it saved."""
    if not force and step % self.every:
      return False
    if step in self._manager.all_steps():
      return False
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(_encode_iter_state(iterator_state)),
      ),
      force=True,
    )
    return True

  def wait(self):
    self._manager.wait_until_finished()

  def restore(self, abstract_state, step: int | None = None):
    """Restores ``(state, iterator_state, step)``; falls back past unreadable checkpoints.

    Args:
      abstract_state: a tree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (e.g. from
        ``jax.eval_shape`` plus the state shardings) or concrete arrays to take shardings from.
      step: a specific step; ``None`` walks back from the newest.

    Raises:
      CheckpointError: if no candidate step restores.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if not steps:
      raise CheckpointError(f"no checkpoint found in {self.directory}.")
    failures = []
    for s in steps:
      try:
        restored = self._manager.restore(
          s,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: try an older one
        failures.append((s, f"{type(e).__name__}: {str(e)[:300]}"))
        continue
      if failures:
        moved = self._move_aside([f[0] for f in failures])
        logging.warning(
          "checkpoint step(s) %s in %s could not be restored (%s); resumed from step %d "
          "instead. The damaged step directories were moved to %s, so those steps are "
          "written again.", [f[0] for f in failures], self.directory, failures[0][1], s, moved,
        )
      return restored["state"], _decode_iter_state(restored["data"] or {}), s
    raise CheckpointError(
      f"no checkpoint in {self.directory} could be restored; tried {failures}. Remove the "
      f"damaged step directories or start from a fresh workdir."
    )

  def _move_aside(self, steps: list[int]) -> list[str]:
    """Moves damaged step directories to ``<directory>.damaged/<step>-<time>`` (process 0),
    keeping them for inspection, and makes the manager forget them so they are rewritten."""
    moved = []
    if jax.process_index() == 0:
      aside = self.directory + ".damaged"
      os.makedirs(aside, exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src):
          dst = os.path.join(aside, f"{step}-{stamp}")
          shutil.move(src, dst)
          moved.append(dst)
    self._manager.reload()
    return moved

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings):
  """``ShapeDtypeStruct`` tree carrying ``shardings``, as a restore target."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


BEST_DIR = "best"  # <workdir>/best/<step>/: the params with the best validation metric


class BestKeeper:
  """Keeps the parameters with the lowest validation metric in ``<workdir>/best/`` (one step,
  plus ``best.json`` with the step, metric and value), surviving resumes."""

  def __init__(self, workdir: str, metric: str = "nll"):
    self.directory = os.path.join(os.path.abspath(workdir), BEST_DIR)
    self.metric = metric
    self.value = float("inf")
    info = os.path.join(self.directory, "best.json")
    if os.path.isfile(info):
      with open(info) as f:
        self.value = float(json.load(f)["value"])

  def update(self, step: int, params, value: float) -> bool:
    """Saves ``params`` when ``value`` beats the best so far. Returns whether it saved."""
    if not value < self.value:
      return False
    ck = Checkpointer(self.directory, keep=1)
    ck.save(step, {"params": params}, force=True)
    ck.close()
    self.value = float(value)
    if jax.process_index() == 0:
      tmp = os.path.join(self.directory, "best.json.tmp")
      with open(tmp, "w") as f:
        json.dump(dict(step=int(step), metric=self.metric, value=float(value)), f)
      os.replace(tmp, os.path.join(self.directory, "best.json"))
    return True


def load_params(directory: str, step: int | None = None, *, item: str = "params"):
  """Loads only the parameters (host numpy arrays) of a training run's checkpoint.

  Args:
    directory: a job workdir (containing ``checkpoints/``) or a checkpoints directory. A
      workdir with ``best/best.json`` (an MLE run that evaluated) gives its best-validation
      parameters unless ``step`` is set.
    step: the step to load; ``None`` takes the best (see above) or else the newest readable one.
    item: ``params`` or ``ref_params``.

  Returns:
    ``(params, step)``: the parameter tree and the step it was read from.

  Raises:
    CheckpointError: when there is no readable checkpoint, naming the directory.
  """
  directory = os.path.abspath(directory)
  best = os.path.join(directory, BEST_DIR)
  if step is None and item == "params" and os.path.isfile(os.path.join(best, "best.json")):
    with open(os.path.join(best, "best.json")) as f:
      info = json.load(f)
    logging.info("loading the best checkpoint of %s: step %d (validation %s %.4f)", directory,
                 info["step"], info["metric"], info["value"])
    directory = best
  else:
    directory = _steps_dir(directory)
  manager = _read_manager(directory)
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no checkpoint steps in {directory}; train first.")
  # Restore onto this process's first device whatever topology wrote the checkpoint.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  errors = []
  for s in steps:
    try:
      meta = manager.item_metadata(s)["state"]
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
      tree = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
      params = tree["state"][item]
      manager.close()
      if errors:
        logging.warning("skipped unreadable checkpoint(s) %s in %s", errors, directory)
      return params, s
    except Exception as e:  # noqa: BLE001
      errors.append((s, f"{type(e).__name__}: {str(e)[:200]}"))
  manager.close()
  raise CheckpointError(f"no readable checkpoint in {directory}: {errors}")


def param_shapes(directory: str, item: str = "params") -> tuple[dict[str, tuple[int, ...]], int]:
  """``({path: shape}, step)`` of the newest checkpoint's parameters, read from its metadata
  only (no array is loaded), so a job can compare them with its model before loading anything.

  Raises:
    CheckpointError: no checkpoint, or no readable metadata.
  """
  directory = _steps_dir(os.path.abspath(directory))
  manager = _read_manager(directory)
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint steps in {directory}; train first.")
    errors = []
    for s in steps:
      try:
        meta = manager.item_metadata(s)["state"][item]
      except Exception as e:  # noqa: BLE001 - an unreadable step: try an older one
        errors.append((s, f"{type(e).__name__}: {str(e)[:200]}"))
        continue
      flat = jax.tree_util.tree_flatten_with_path(meta)[0]
      return {_path_str(p): tuple(m.shape) for p, m in flat}, s
    raise CheckpointError(f"no readable checkpoint metadata in {directory}: {errors}")
  finally:
    manager.close()


def _steps_dir(directory: str) -> str:
  """The directory holding ``<step>/`` dirs: ``<workdir>/checkpoints`` or ``directory``."""
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(
      f"checkpoint directory {directory} does not exist; point to the workdir of a finished "
      "training run (it contains checkpoints/<step>/)."
    )
  return directory


def _read_manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    directory,
    item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
  )


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
