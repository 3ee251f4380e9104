"""Training: sharded step == single-device step, exact kill-and-resume, clear errors."""

import json
import shutil

import jax
import numpy as np
import pytest

from slicjax import optim, sharding, training
from slicjax.data.iterators import ArrayBatchIterator
from slicjax.data.synthetic import reverse_task
from slicjax.models.factory import build_model

MODEL = dict(preset="tiny", vocab_size=32, max_len=32)


def _setup(mesh_shape, model_cfg=MODEL, lr=3e-3, steps=12, opt=None):
  model = build_model(model_cfg)
  tx, sched = optim.make_optimizer(dict(learning_rate=lr, warmup_steps=2, **(opt or {})), steps)
  mesh = sharding.make_mesh(mesh_shape)
  state, sh = training.create_train_state(model, tx, mesh, jax.random.PRNGKey(0))
  step = training.make_train_step(training.mle_loss_fn(model, label_smoothing=0.1, z_loss=1e-4),
                                  tx, mesh, sh, sched)
  return model, mesh, state, sh, step


def _iter():
  return ArrayBatchIterator(reverse_task(64, vocab_size=32), 8, 8, 9, seed=3)


@pytest.mark.parametrize("model_cfg", [MODEL, dict(MODEL, num_encoder_layers=1, num_kv_heads=4)])
def test_sharded_step_matches_single_device(model_cfg):
  one = jax.devices()[:1]
  model = build_model(model_cfg)
  # SGD: Adam's m/sqrt(v) turns float-noise-level gradient differences on near-zero gradients
  # into full-size updates, which would hide what this test checks (same math under sharding).
  tx, _ = optim.make_optimizer(dict(learning_rate=0.5, name="sgd"), 10)
  results = []
  for mesh in (sharding.make_mesh((1, 1, 1), devices=one), sharding.make_mesh((2, 2, 2))):
    state, sh = training.create_train_state(model, tx, mesh, jax.random.PRNGKey(0))
    step = training.make_train_step(training.mle_loss_fn(model), tx, mesh, sh)
    it = _iter()
    for _ in range(3):
      state, metrics = step(state, sharding.shard_batch(next(it), mesh))
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  (p1, l1), (p8, l8) = results
  assert abs(l1 - l8) < 1e-5
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)  # reduction order differs
  # The 8-device params really are sharded (not everything replicated).
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(state.params))


def test_kill_and_resume_equals_uninterrupted(tmp_path):
  loop = dict(log_every=2, checkpoint_every=3, progress=False)
  _, mesh, state, sh, step = _setup((4, 2, 1))
  full = training.train(state=state, state_shardings=sh, train_step=step, train_iter=_iter(),
                        mesh=mesh, workdir=str(tmp_path / "full"),
                        loop=training.LoopConfig(steps=12, **loop))
  # First run stops at step 6 (as if killed after the checkpoint at 6) ...
  _, mesh, state, sh, step = _setup((4, 2, 1))
  training.train(state=state, state_shardings=sh, train_step=step, train_iter=_iter(), mesh=mesh,
                 workdir=str(tmp_path / "resumed"), loop=training.LoopConfig(steps=6, **loop))
  # ... and a fresh process-like restart (new state, new iterator) resumes to step 12.
  _, mesh, state, sh, step = _setup((4, 2, 1))
  resumed = training.train(state=state, state_shardings=sh, train_step=step, train_iter=_iter(),
                           mesh=mesh, workdir=str(tmp_path / "resumed"),
                           loop=training.LoopConfig(steps=12, **loop))
  assert int(resumed.step) == 12
  for a, b in zip(jax.tree.leaves(jax.device_get(full.params)),
                  jax.tree.leaves(jax.device_get(resumed.params))):
    np.testing.assert_array_equal(a, b)
  lines = open(tmp_path / "full" / "metrics.jsonl").read().splitlines()
  assert len(lines) == 6


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
  loop = training.LoopConfig(steps=6, log_every=3, checkpoint_every=3, progress=False)
  _, mesh, state, sh, step = _setup((8, 1, 1))
  training.train(state=state, state_shardings=sh, train_step=step, train_iter=_iter(), mesh=mesh,
                 workdir=str(tmp_path), loop=loop)
  newest = tmp_path / "checkpoints" / "6" / "state"
  assert newest.exists()
  shutil.rmtree(newest)  # a missing directory entry in the newest checkpoint
  _, mesh, state, sh, step = _setup((8, 1, 1))
  from slicjax import checkpoint

  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  restored, it_state, used = ck.restore(checkpoint.abstract_like(state, sh))
  # The damaged step is moved aside (kept for inspection) and forgotten, so it is rewritten.
  assert ck.all_steps() == [3]
  ck.close()
  assert used == 3 and int(restored.step) == 3 and it_state["position"] == 24
  assert not (tmp_path / "checkpoints" / "6").exists()
  aside = list((tmp_path / "checkpoints.damaged").iterdir())
  assert [p.name.split("-")[0] for p in aside] == ["6"]
  # Resuming recomputes steps 4..6: step 6 is checkpointed again and logged once.
  _, mesh, state, sh, step = _setup((8, 1, 1))
  training.train(state=state, state_shardings=sh, train_step=step, train_iter=_iter(), mesh=mesh,
                 workdir=str(tmp_path), loop=loop)
  assert (tmp_path / "checkpoints" / "6" / "state").exists()
  rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl").read().splitlines()]
  assert [r["step"] for r in rows] == [3, 6]


def test_metric_writer_drops_rows_after_resume_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(dict(step=s, split="train", loss=1.0)) + "\n"
                          for s in (2, 4, 6, 8)) + '{"step": 10, "spl')  # last line cut by a kill
  w = training.MetricWriter(str(tmp_path), enabled=True, resume_step=4)
  w.write(6, dict(loss=0.5))
  w.close()
  rows = [json.loads(x) for x in path.read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(2, 1.0), (4, 1.0), (6, 0.5)]


def test_non_finite_loss_names_step_and_checkpoint(tmp_path):
  _, mesh, state, sh, step = _setup((8, 1, 1), lr=1e12, opt=dict(clip_norm=0.0, name="sgd"))
  with pytest.raises(training.NonFiniteLossError, match=r"non-finite loss .* at step \d+"):
    training.train(state=state, state_shardings=sh, train_step=step, train_iter=_iter(),
                   mesh=mesh, workdir=str(tmp_path),
                   loop=training.LoopConfig(steps=50, checkpoint_every=1, progress=False))


def test_missing_workdir_and_bad_optimizer_raise():
  _, mesh, state, sh, step = _setup((8, 1, 1))
  with pytest.raises(ValueError, match="workdir"):
    training.train(state=state, state_shardings=sh, train_step=step, train_iter=_iter(),
                   mesh=mesh, workdir="", loop=training.LoopConfig(steps=1))
  with pytest.raises(ValueError, match="unknown optimizer config key"):
    optim.make_optimizer(dict(learning_rat=1.0), 10)
  with pytest.raises(ValueError, match="mesh shape"):
    sharding.make_mesh((3, 1, 1))


def test_grad_accumulation_applies_mean_of_micro_batch_gradients():
  model = build_model(MODEL)
  mesh = sharding.make_mesh((8, 1, 1))
  it = ArrayBatchIterator(reverse_task(16, vocab_size=32), 8, 8, 9, shuffle=False)
  b1, b2 = next(it), next(it)
  lr = 0.5
  tx, _ = optim.make_optimizer(dict(learning_rate=lr, name="sgd", grad_accum_steps=2,
                                    clip_norm=0.0), 4)
  state, sh = training.create_train_state(model, tx, mesh, jax.random.PRNGKey(0))
  p0 = jax.device_get(state.params)
  loss_fn = training.mle_loss_fn(model)
  g1, g2 = (jax.grad(lambda p, b=b: loss_fn(p, b, jax.random.PRNGKey(0), None)[0])(p0) for b in (b1, b2))
  step = training.make_train_step(loss_fn, tx, mesh, sh)
  state, _ = step(state, sharding.shard_batch(b1, mesh))
  mid = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(mid), jax.tree.leaves(p0)):
    np.testing.assert_array_equal(a, b)  # no update after the first micro-batch
  state, _ = step(state, sharding.shard_batch(b2, mesh))
  expected = jax.tree.map(lambda p, x, y: p - lr * (x + y) / 2, p0, g1, g2)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_best_keeper_keeps_lowest_validation_params_and_load_params_prefers_them(tmp_path):
  from slicjax import checkpoint

  model = build_model(MODEL)
  p0 = model.init(jax.random.PRNGKey(0), input_len=4, target_len=4)
  p1 = jax.tree.map(lambda x: x + 1.0, p0)
  p2 = jax.tree.map(lambda x: x + 2.0, p0)
  # The run's newest checkpoint holds p2; validation was best at step 10 (p1).
  tx, _ = optim.make_optimizer(dict(learning_rate=1e-3), 10)
  from slicjax.train_state import TrainState

  ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  ck.save(30, TrainState.create(p2, tx, jax.random.PRNGKey(0)), force=True)
  ck.close()
  keeper = checkpoint.BestKeeper(str(tmp_path))
  assert keeper.update(5, p0, 3.0) and keeper.update(10, p1, 2.5)
  assert not checkpoint.BestKeeper(str(tmp_path)).update(20, p2, 2.7)  # survives a restart
  params, step = checkpoint.load_params(str(tmp_path))
  assert step == 10
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p1)):
    np.testing.assert_array_equal(a, b)
  assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["10", "best.json"]
  _, newest = checkpoint.load_params(str(tmp_path), 30)  # an explicit step still works
  assert newest == 30
