"""Parameter-efficient fine-tuning: frozen optimizer groups, LoRA adapters, merge-on-export."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slicjax import checkpoint, optim, peft, sharding, training
from slicjax.data.iterators import ArrayBatchIterator
from slicjax.data.synthetic import reverse_task
from slicjax.decoding.api import decode
from slicjax.models.factory import build_model

MODEL = dict(preset="tiny", vocab_size=32, max_len=32)
ENCDEC = dict(MODEL, num_encoder_layers=1, num_kv_heads=4)
FREEZE = "token_embed,decoder/layer_0/"


def _batch(n=8, seed=3):
  return next(ArrayBatchIterator(reverse_task(64, vocab_size=32), n, 8, 9, seed=seed))


def _loss_grad(model):
  loss_fn = training.mle_loss_fn(model)
  return jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, jax.random.PRNGKey(0), None)[0]))


def _flat(tree):
  return dict(zip(optim.tree_paths(tree), jax.tree.leaves(jax.device_get(tree))))


def _array_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if getattr(x, "ndim", 0) >= 1]


def _with_random_b(params, seed=5, scale=0.3):
  """LoRA params whose ``b`` is non-zero, so the adapters change the model."""
  def fill(path, x):
    if path[-1].key != "b":
      return x
    key = jax.random.fold_in(jax.random.PRNGKey(seed), hash(jax.tree_util.keystr(path)) % 2**31)
    return scale * jax.random.normal(key, x.shape, x.dtype)

  return {"base": params["base"], "lora": jax.tree_util.tree_map_with_path(fill, params["lora"])}


# --------------------------------------------------------------------------------------------
# Frozen groups


@pytest.mark.parametrize("accum", [1, 2])
def test_freeze_keeps_frozen_leaves_and_trains_the_rest(accum):
  model = build_model(MODEL)
  params = model.init(jax.random.PRNGKey(0))
  tx, _ = optim.make_optimizer(
    dict(learning_rate=1e-2, weight_decay=0.1, clip_norm=0.5, freeze=FREEZE,
         grad_accum_steps=accum), 10,
  )
  opt_state = tx.init(params)
  frozen = optim.frozen_flags(params, FREEZE)
  n_train = frozen.count(False)
  assert 0 < n_train < len(frozen)
  # Frozen leaves hold no optimizer state: Adam's mu and nu (and MultiSteps' accumulator).
  assert len(_array_leaves(opt_state)) == (2 if accum == 1 else 3) * n_train
  grad_fn, batch = _loss_grad(model), _batch()

  @jax.jit
  def step(p, opt_state):
    _, grads = grad_fn(p, batch)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  p = params
  for _ in range(2 * accum):
    p, opt_state = step(p, opt_state)
  before, after = _flat(params), _flat(p)
  for (path, a), is_frozen in zip(before.items(), frozen):
    if is_frozen:
      np.testing.assert_array_equal(after[path], a, err_msg=path)
    else:
      assert not np.array_equal(after[path], a), f"trainable {path} did not change"


def test_freeze_clips_by_the_trainable_gradient_norm_only():
  model = build_model(MODEL)
  params = model.init(jax.random.PRNGKey(0))
  clip, lr = 1e-3, 1.0
  tx, _ = optim.make_optimizer(
    dict(name="sgd", schedule="constant", learning_rate=lr, clip_norm=clip, freeze=FREEZE), 10
  )
  _, grads = _loss_grad(model)(params, _batch())
  updates, _ = tx.update(grads, tx.init(params), params)
  frozen = optim.frozen_flags(params, FREEZE)
  g = jax.tree.leaves(grads)
  train_norm = np.sqrt(sum(float(jnp.sum(x * x)) for x, f in zip(g, frozen) if not f))
  all_norm = float(optax.global_norm(grads))
  assert all_norm > 1.05 * train_norm  # the frozen gradients would change the clip factor
  factor = min(1.0, clip / train_norm)
  for u, x, f in zip(jax.tree.leaves(updates), g, frozen):
    expected = np.zeros_like(x) if f else -lr * factor * np.asarray(x)
    np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-12)


def test_no_freeze_keeps_the_optimizer_state_layout():
  """freeze='' on ordinary params: the same state tree as before, so old checkpoints restore."""
  params = build_model(MODEL).init(jax.random.PRNGKey(0))
  plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lambda step: 1e-3))
  tx, _ = optim.make_optimizer({}, 10)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params))
  tx, _ = optim.make_optimizer(dict(grad_accum_steps=2), 10)
  multi = optax.MultiSteps(plain, every_k_schedule=2)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(multi.init(params))
  assert "freeze" in optim.DEFAULTS


def test_count_params():
  model = build_model(MODEL)
  params = model.init(jax.random.PRNGKey(0))
  total = sum(x.size for x in jax.tree.leaves(params))
  assert peft.count_params(params) == (total, total)
  embed = params["token_embed"]["embedding"].size
  assert peft.count_params(params, "token_embed") == (total - embed, total)
  _, lp = peft.add_lora(model, params, rank=4, rng=jax.random.PRNGKey(1))
  n_lora = sum(x.size for x in jax.tree.leaves(lp["lora"]))
  assert peft.count_params(lp) == (n_lora, total + n_lora)
  assert peft.count_params(lp, peft.trainable_freeze_pattern()) == (n_lora, total + n_lora)


# --------------------------------------------------------------------------------------------
# LoRA


def test_fresh_lora_matches_base_and_init_fn_matches_add_lora():
  model = build_model(MODEL)
  params = model.init(jax.random.PRNGKey(0))
  lm, lp = peft.add_lora(model, params, rank=4, rng=jax.random.PRNGKey(1))
  assert peft.is_lora(lp) and not peft.is_lora(params)
  assert (lm.module, lm.max_len, lm.vocab_size, lm.family) == (
    model.module, model.max_len, model.vocab_size, model.family)
  assert lm.separator_id == model.separator_id  # data attributes read through
  batch = _batch()
  base_logits, _ = model.target_logits(params, batch)
  lora_logits, _ = lm.target_logits(lp, batch)
  np.testing.assert_array_equal(lora_logits, base_logits)  # b = 0: exactly the base model
  # Sharded init: init_fn (under eval_shape) gives the same tree as add_lora.
  abstract = jax.eval_shape(lm.init_fn(), jax.random.PRNGKey(0))
  assert jax.tree.map(jnp.shape, lm.init(jax.random.PRNGKey(0))) == jax.tree.map(jnp.shape, lp)
  assert jax.tree.structure(training._unbox(abstract)["params"]) == jax.tree.structure(lp)
  mesh = sharding.make_mesh((2, 2, 2))
  tx, _ = optim.make_optimizer({}, 10)
  state, _ = training.create_train_state(lm, tx, mesh, jax.random.PRNGKey(2))
  assert jax.tree.structure(state.params) == jax.tree.structure(lp)
  assert all(not np.any(x["b"]) for x in jax.tree.leaves(
    state.params["lora"], is_leaf=lambda x: isinstance(x, dict) and "b" in x))


def test_lora_training_updates_only_adapters(tmp_path):
  model = build_model(MODEL)
  params = model.init(jax.random.PRNGKey(0))
  lm, lp = peft.add_lora(model, params, rank=4, alpha=8.0, rng=jax.random.PRNGKey(1))
  mesh = sharding.make_mesh((2, 2, 2))
  tx, sched = optim.make_optimizer(
    dict(learning_rate=1e-2, weight_decay=0.1, clip_norm=1.0), 8)  # no freeze: automatic
  state, sh = training.create_train_state(lm, tx, mesh, jax.random.PRNGKey(0), params=lp,
                                          init_kwargs=dict(input_len=8, target_len=9))
  n_lora = len(jax.tree.leaves(lp["lora"]))
  assert len(_array_leaves(state.opt_state)) == 2 * n_lora  # no moments for the base
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params["lora"]))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params["base"]))
  step = training.make_train_step(training.mle_loss_fn(lm), tx, mesh, sh, sched)
  batch = sharding.shard_batch(_batch(), mesh)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.2, losses
  before, after = _flat(lp), _flat(state.params)
  for path, a in before.items():
    if path.startswith("base/"):
      np.testing.assert_array_equal(after[path], a, err_msg=path)
    else:
      assert not np.array_equal(after[path], a), f"adapter {path} did not change"
  # The whole {"base", "lora"} state checkpoints and restores.
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(8, state, None, force=True)
  ck.wait()
  restored, _, _ = ck.restore(checkpoint.abstract_like(state, sh))
  ck.close()
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cfg", [MODEL, ENCDEC], ids=["prefix_lm", "encoder_decoder"])
def test_merge_gives_the_lora_model_logits(cfg):
  model = build_model(cfg)
  params = model.init(jax.random.PRNGKey(0))
  lm, lp = peft.add_lora(model, params, rank=4, targets=peft.ALL_TARGETS,
                         rng=jax.random.PRNGKey(1))
  lp = _with_random_b(lp)
  inner, merged = peft.merge(lm, lp)
  assert inner is model and not peft.is_lora(merged)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  batch = _batch()
  lora_logits, _ = jax.jit(lm.target_logits)(lp, batch)
  merged_logits, _ = jax.jit(inner.target_logits)(merged, batch)
  np.testing.assert_allclose(merged_logits, lora_logits, atol=1e-5)
  base_logits, _ = jax.jit(model.target_logits)(params, batch)
  assert float(jnp.max(jnp.abs(lora_logits - base_logits))) > 1e-2  # adapters do something
  cands = jnp.stack([batch["targets"], batch["targets"][::-1]], axis=1)
  np.testing.assert_allclose(jax.jit(lm.candidate_logits)(lp, batch["inputs"], cands)[0],
                             jax.jit(inner.candidate_logits)(merged, batch["inputs"], cands)[0],
                             atol=1e-5)
  assert peft.merge(model, params) == (model, params)  # identity for plain models


def test_lora_decoding_equals_merged_decoding():
  model = build_model(MODEL)
  params = model.init(jax.random.PRNGKey(0))
  lm, lp = peft.add_lora(model, params, rank=4, targets=peft.ALL_TARGETS,
                         rng=jax.random.PRNGKey(1))
  lp = _with_random_b(lp)
  inputs = _batch(4)["inputs"]
  got = decode(lm, lp, inputs, method="greedy", max_len=8)
  want = decode(*peft.merge(lm, lp), inputs, method="greedy", max_len=8)
  np.testing.assert_array_equal(got.tokens_BxKxL, want.tokens_BxKxL)
  np.testing.assert_allclose(got.logp_BxK, want.logp_BxK, atol=1e-4)
  plain = decode(model, params, inputs, method="greedy", max_len=8)
  assert not np.array_equal(got.tokens_BxKxL, plain.tokens_BxKxL)  # the adapters change the output


# --------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_freeze_patterns_raise():
  params = build_model(MODEL).init(jax.random.PRNGKey(0))
  tx, _ = optim.make_optimizer(dict(freeze="token_embed,no_such_layer"), 10)
  with pytest.raises(ValueError, match=r"\['no_such_layer'\] match no parameter"):
    tx.init(params)
  tx, _ = optim.make_optimizer(dict(freeze="decoder,token_embed"), 10)
  with pytest.raises(ValueError, match="freezes every parameter"):
    tx.init(params)
  with pytest.raises(ValueError, match="not a valid regular expression"):
    optim.make_optimizer(dict(freeze="layer_(0"), 10)
  assert optim.split_patterns(" a{1,2} , [,] ,,b ") == ["a{1,2}", "[,]", "b"]


def test_bad_lora_inputs_raise():
  model = build_model(MODEL)
  params = model.init(jax.random.PRNGKey(0))
  rng = jax.random.PRNGKey(1)
  with pytest.raises(ValueError, match=r"match no kernel.*self_attention/query/kernel"):
    peft.add_lora(model, params, targets="attention_q", rng=rng)
  for rank in (0, -2, 1.5):
    with pytest.raises(ValueError, match="rank must be an int > 0"):
      peft.add_lora(model, params, rank=rank, rng=rng)
  with pytest.raises(ValueError, match="alpha"):
    peft.add_lora(model, params, alpha=0.0, rng=rng)
  lm, lp = peft.add_lora(model, params, rng=rng)
  with pytest.raises(ValueError, match="already have LoRA adapters"):
    peft.add_lora(lm, lp, rng=rng)
  with pytest.raises(ValueError, match="plain PrefixLM"):
    peft.merge(model, lp)
  with pytest.raises(ValueError, match="needs params"):
    lm.target_logits(params, _batch())
  with pytest.raises(ValueError, match="rank the adapters were created with"):
    peft.LoRAModel.wrap(model, rank=2).target_logits(lp, _batch())
  assert not hasattr(lm, "mle_loss")  # the prefix LM has none: the ELBO path stays off
