"""MLE fine-tuning job: config -> sharded model -> train loop with eval and checkpoints."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from slicjax import checkpoint, optim, sharding, training
from slicjax.pipelines import common, tasks, validation

TRAIN_KEYS = dict(
  steps=1000, batch_size=32, log_every=50, eval_every=0, eval_batches=4,
  checkpoint_every=500, keep_checkpoints=3, seed=0, label_smoothing=0.0, z_loss=0.0,
  progress=True, keep_best=True,
)


def train_config(config) -> dict[str, Any]:
  t = common.to_dict(config.get("train"))
  common.check_keys(t, TRAIN_KEYS, "train")
  t = {**TRAIN_KEYS, **t}
  validation.count(t["steps"], "train.steps")
  for k in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    validation.count(t[k], f"train.{k}")
  validation.count(t["eval_every"], "train.eval_every", minimum=0)
  return t


def make_eval_fn(model, mesh, state_sh, eval_batches):
  """Mean token NLL / perplexity over fixed validation batches."""
  loss_fn = training.mle_loss_fn(model)
  step = training.make_eval_step(loss_fn, mesh, state_sh)

  def eval_fn(state):
    nll, tokens = 0.0, 0.0
    for batch in eval_batches:
      m = step(state, sharding.shard_batch(batch, mesh))
      nll += float(m["nll"]) * float(m["tokens"])
      tokens += float(m["tokens"])
    mean = nll / max(tokens, 1.0)
    return {"nll": mean, "perplexity": float(np.exp(min(mean, 50.0)))}

  return eval_fn


def _keeping_best(eval_fn, keeper):
  def fn(state):
    ev = eval_fn(state)
    if keeper.update(int(jax.device_get(state.step)), state.params, ev["nll"]):
      ev["best"] = 1.0
    return ev

  return fn


def run(config, workdir: str, *, on_log=None, init_params=None, loss_fn=None):
  """Trains ``config.model`` with MLE on ``config.data``; returns ``(state, model, data)``.

  ``init_params`` (instead of a random or pretrained init) and ``loss_fn`` (instead of the
  token cross-entropy / −ELBO) let adaptations reuse this loop, e.g.
  :func:`slicjax.pipelines.diffusion_adapt.run`."""
  t = train_config(config)
  validation.optimizer(config)
  workdir = common.prepare_workdir(workdir, config)
  common.log_devices()
  mesh = common.make_mesh(config)
  data = tasks.load(config, batch_size=t["batch_size"], seed=t["seed"], mesh=mesh)
  if data.lengths and data.lengths["chosen_from_data"] and jax.process_index() == 0:
    with open(os.path.join(workdir, "data_lengths.json"), "w") as f:  # what 0 resolved to
      json.dump(data.lengths, f, indent=2)
  model = common.model_from(config)
  if model.vocab_size < data.vocab_size:
    raise ValueError(
      f"model vocab_size {model.vocab_size} is smaller than the tokenizer's {data.vocab_size}; "
      f"set model.vocab_size >= {data.vocab_size}."
    )
  pre = common.pretrained(config)
  params = pre[1] if pre is not None else None  # fine-tune the pretrained weights
  if init_params is not None:
    params = init_params
  model, params = common.maybe_lora(config, model, params, t["seed"])
  tx, schedule = optim.make_optimizer(common.to_dict(config.get("optimizer")), t["steps"])
  state, state_sh = training.create_train_state(
    model, tx, mesh, jax.random.PRNGKey(t["seed"]), params=params,
    init_kwargs=dict(input_len=data.input_len, target_len=data.target_len),
  )
  if loss_fn is None:
    loss_fn = training.mle_loss_fn(
      model, label_smoothing=t["label_smoothing"], z_loss=t["z_loss"]
    )
  train_step = training.make_train_step(loss_fn, tx, mesh, state_sh, schedule)
  eval_fn = None
  if t["eval_every"]:
    eval_fn = make_eval_fn(model, mesh, state_sh, data.eval_batches(t["eval_batches"]))
    if t["keep_best"]:  # later stages load the best-validation params (the paper's choice)
      eval_fn = _keeping_best(eval_fn, checkpoint.BestKeeper(workdir, "nll"))
  state = training.train(
    state=state, state_shardings=state_sh, train_step=train_step, train_iter=data.train_iter(),
    mesh=mesh, workdir=workdir, eval_fn=eval_fn, on_log=on_log,
    loop=training.LoopConfig(
      steps=t["steps"], log_every=t["log_every"], eval_every=t["eval_every"],
      checkpoint_every=t["checkpoint_every"], keep_checkpoints=t["keep_checkpoints"],
      progress=t["progress"],
    ),
  )
  return state, model, data
