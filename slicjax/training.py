"""Train/eval step builders and the training loop shared by every binary.

A *loss function* has the signature ``loss_fn(params, batch, rng, state) -> (loss, metrics)``
(``state`` gives access to frozen ``ref_params``). :func:`make_train_step` turns it into a
``jax.jit``-compiled, sharded, donating step; :func:`train` runs the loop: progress bar, periodic
eval, JSON-lines + TensorBoard metrics, checkpoints with the data position, resume, a clear error
on a non-finite loss, and a checkpoint-and-exit on SIGTERM (preemption).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slicjax import checkpoint as ckpt_lib
from slicjax import scoring, sharding
from slicjax.losses import mle
from slicjax.models.seq_model import SeqModel
from slicjax.train_state import TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite."""


class Preempted(RuntimeError):
  """Training stopped on SIGTERM after writing a checkpoint; restart to resume."""


# --------------------------------------------------------------------------------------------
# State creation


def create_train_state(
  model: SeqModel, tx: optax.GradientTransformation, mesh: Mesh, rng, *, params=None,
  ref_params=None, init_kwargs: dict | None = None,
) -> tuple[TrainState, Any]:
  """Initializes (or wraps given) params directly in their shardings.

  Returns ``(state, state_shardings)``. Parameter shardings come from the modules' logical axis
  names via ``jax.eval_shape`` of the init (nothing is materialized unsharded).
  """
  init_fn = model.init_fn(**(init_kwargs or {}))
  with sharding.use_mesh(mesh):
    abstract_vars = jax.eval_shape(init_fn, rng)
    param_sh = sharding.tree_shardings(mesh, abstract_vars)["params"]
  init_rng, state_rng = jax.random.split(rng)

  def make_state(init_rng, state_rng, params, ref_params):
    if params is None:
      params = jax.tree.map(lambda x: x, _unbox(init_fn(init_rng))["params"])
    return TrainState.create(params, tx, state_rng, ref_params=ref_params)

  # Given params (e.g. loaded on one device) move onto the mesh first.
  rep = sharding.replicated(mesh)
  init_rng, state_rng = jax.device_put((init_rng, state_rng), rep)
  if params is not None:
    params = jax.device_put(params, param_sh)
  if ref_params is not None:
    ref_params = jax.device_put(ref_params, param_sh)
  abstract_state = jax.eval_shape(make_state, init_rng, state_rng, params, ref_params)
  state_sh = _state_shardings(abstract_state, param_sh, mesh)
  with sharding.use_mesh(mesh):
    state = jax.jit(make_state, out_shardings=state_sh)(init_rng, state_rng, params, ref_params)
  return state, state_sh


def _unbox(tree):
  import flax.linen as nn

  return nn.unbox(tree)


def _state_shardings(abstract_state: TrainState, param_sh, mesh: Mesh):
  """Params (and same-shaped optimizer moments, and ref params) follow the param shardings."""
  rep = sharding.replicated(mesh)
  flat_params, _ = jax.tree.flatten(abstract_state.params)
  flat_sh = jax.tree.leaves(param_sh)
  by_shape: dict[tuple, Any] = {}
  for p, s in zip(flat_params, flat_sh):
    by_shape.setdefault(p.shape, s)

  def opt_leaf(x):
    # Adam moments have the param's shape: shard them like a param of that shape.
    return by_shape.get(getattr(x, "shape", None), rep) if getattr(x, "ndim", 0) >= 1 else rep

  ref_sh = None
  if abstract_state.ref_params is not None:
    ref_sh = param_sh
  return TrainState(
    step=rep,
    params=param_sh,
    opt_state=jax.tree.map(opt_leaf, abstract_state.opt_state),
    rng=rep,
    ref_params=ref_sh,
  )


# --------------------------------------------------------------------------------------------
# Steps


def mle_loss_fn(model: SeqModel, *, label_smoothing: float = 0.0, z_loss: float = 0.0) -> LossFn:
  """Token cross-entropy on the targets (padding and packing masks respected)."""

  if hasattr(model, "mle_loss"):  # diffusion: the one-sample -ELBO, per token

    def elbo_loss_fn(params, batch, rng, state):
      del state
      per_example = model.mle_loss(params, batch, rng)
      tokens = jnp.sum(scoring.target_mask(batch["targets"]))
      loss = jnp.sum(per_example) / jnp.maximum(tokens, 1.0)
      return loss, {"nll": loss, "tokens": tokens}

    return elbo_loss_fn

  def loss_fn(params, batch, rng, state):
    del state
    logits, _ = model.target_logits(
      params, batch, deterministic=False, rngs={"dropout": rng}
    )
    mask = scoring.target_mask(batch["targets"])
    if "targets_segment_ids" in batch:
      mask = mask * (batch["targets_segment_ids"] != 0)
    loss, nll = mle.token_cross_entropy(
      logits, batch["targets"], label_smoothing=label_smoothing, z_loss=z_loss
    )
    return mle.masked_mean(loss, mask), {
      "nll": mle.masked_mean(nll, mask),
      "tokens": jnp.sum(mask),
    }

  return loss_fn


def make_train_step(
  loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh, state_shardings,
  schedule: optax.Schedule | None = None,
):
  """``(state, batch) -> (state, metrics)`` compiled with in/out shardings and state donation."""

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, batch, rng, state
    )
    new_state = state.apply_gradients(grads, tx)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    return new_state, metrics

  batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  jitted = jax.jit(
    step, in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, None),
    donate_argnums=(0,),
  )

  def run(state, batch):
    with sharding.use_mesh(mesh):
      return jitted(state, batch)

  run.jitted = jitted  # for ``run.jitted.lower(state, batch)`` (HLO, cost analysis, profiling)
  return run


def make_eval_step(loss_fn: LossFn, mesh: Mesh, state_shardings):
  """``(state, batch) -> metrics`` (no gradient; deterministic loss_fn recommended)."""

  def step(state, batch):
    loss, metrics = loss_fn(state.params, batch, jax.random.PRNGKey(0), state)
    return dict(metrics, loss=loss)

  batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sh))

  def run(state, batch):
    with sharding.use_mesh(mesh):
      return jitted(state, batch)

  return run


# --------------------------------------------------------------------------------------------
# Metrics


class MetricWriter:
  """JSON lines (``metrics.jsonl``) and TensorBoard event files; process 0 writes, others no-op.

  ``resume_step``: the step a resumed run continues from. Rows after it (written by the
  interrupted run for steps that will now be recomputed, e.g. after a fallback past a damaged
  checkpoint) are dropped from ``metrics.jsonl``, and TensorBoard is told to purge its events
  after it, so every step appears once.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._f = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None and os.path.exists(path):
        _truncate_metrics(path, resume_step)
      self._f = open(path, "a")
      try:
        SummaryWriter = _summary_writer_class()
        purge = None if resume_step is None else int(resume_step) + 1
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)
      except ImportError:  # optional
        self._tb = None

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train"):
    if not self.enabled:
      return
    row = {"step": int(step), "split": prefix, **{k: float(v) for k, v in metrics.items()}}
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

  def close(self):
    if self._f:
      self._f.close()
    if self._tb is not None:
      self._tb.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
  is installed (2.7 s here, on every job start) only to accept torch tensors, which slicjax
  never passes."""
  import sys

  block = "torch" not in sys.modules
  if block:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    if block:
      del sys.modules["torch"]
  return SummaryWriter


def _truncate_metrics(path: str, last_step: int):
  """Rewrites ``metrics.jsonl`` without the rows after ``last_step`` (atomically)."""
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      step = json.loads(line).get("step")
    except json.JSONDecodeError:  # a line cut by a kill: drop it
      continue
    if step is None or int(step) <= last_step:
      keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)
  logging.info("metrics.jsonl: dropped %d row(s) after step %d (recomputed on resume)",
               len(lines) - len(keep), last_step)


# --------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class LoopConfig:
  steps: int = 1000
  log_every: int = 50
  eval_every: int = 0
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  progress: bool = True


class _SigtermFlag:
  def __init__(self):
    self.set = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.set = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _iter_state(it) -> Any:
  return it.get_state() if hasattr(it, "get_state") else None


def train(
  *, state: TrainState, state_shardings, train_step, train_iter: Iterator, mesh: Mesh,
  workdir: str, loop: LoopConfig, eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
  on_log: Callable[[int, dict], None] | None = None,
) -> TrainState:
  """Runs ``train_step`` until ``loop.steps``, resuming from ``workdir/checkpoints`` if present.

  ``train_iter`` yields host-local numpy batches and may offer ``get_state``/``set_state``
  (grain iterators do) so the data position is checkpointed with the state.

  Raises:
    NonFiniteLossError: on a NaN/inf loss, naming the step and the last good checkpoint.
    Preempted: after SIGTERM, once the checkpoint at the next step boundary is written.
  """
  if not workdir:
    raise ValueError("workdir is empty; pass --workdir=/path/to/run (it is created if missing).")
  os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), every=loop.checkpoint_every, keep=loop.keep_checkpoints
  )
  if ckpt.latest_step() is not None:
    abstract = ckpt_lib.abstract_like(state, state_shardings)
    state, it_state, step0 = ckpt.restore(abstract)
    if it_state is not None and hasattr(train_iter, "set_state"):
      train_iter.set_state(it_state)
    logging.info("resumed from step %d in %s", step0, workdir)
  start = int(jax.device_get(state.step))
  writer = MetricWriter(workdir, resume_step=start)
  is_main = jax.process_index() == 0
  bar = None
  if loop.progress and is_main:
    from tqdm.auto import tqdm

    bar = tqdm(total=loop.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               mininterval=1.0)
  pending: list[dict] = []
  t0 = time.time()
  last_logged = start
  try:
    with _SigtermFlag() as sigterm:
      for step in range(start, loop.steps):
        batch = next(train_iter)
        batch = sharding.shard_batch(batch, mesh)
        state, metrics = train_step(state, batch)
        pending.append(metrics)
        done = step + 1
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
          good = ckpt.latest_step()
          raise NonFiniteLossError(
            f"non-finite loss ({loss}) at step {done}; last good checkpoint: "
            f"{'step ' + str(good) + ' in ' + ckpt.directory if good is not None else 'none'}. "
            "Lower the learning rate, enable gradient clipping, or check the data."
          )
        if bar is not None:
          bar.update(1)
        if done % loop.log_every == 0 or done == loop.steps:
          host = jax.device_get(pending)
          mean = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
          dt = time.time() - t0
          mean["steps_per_sec"] = (done - last_logged) / max(dt, 1e-9)
          if "tokens" in mean:
            mean["tokens_per_sec"] = mean["tokens"] * mean["steps_per_sec"]
          writer.write(done, mean, "train")
          if bar is not None:
            bar.set_postfix(loss=f"{mean['loss']:.4f}", refresh=False)
          if on_log is not None:
            on_log(done, mean)
          pending, t0, last_logged = [], time.time(), done
        if eval_fn is not None and loop.eval_every and done % loop.eval_every == 0:
          ev = eval_fn(state)
          writer.write(done, ev, "eval")
          if is_main:
            logging.info("step %d eval %s", done, ev)
        ckpt.save(done, state, _iter_state(train_iter), force=(done == loop.steps))
        if sigterm.set:
          ckpt.save(done, state, _iter_state(train_iter), force=True)
          ckpt.wait()
          raise Preempted(
            f"SIGTERM received: checkpoint written at step {done} in {ckpt.directory}; rerun "
            "the same command to resume."
          )
    ckpt.save(int(jax.device_get(state.step)), state, _iter_state(train_iter), force=True)
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    ckpt.close()
  return state
