"""Masked diffusion process: schedules, forward masking, substitution, ELBO estimators, wrapper."""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from slicjax.models import diffusion as dm

V, MASK = 8, 7  # ids 4, 5, 6 are the data tokens of the tiny joint; 7 is [MASK]
DATA = np.array([4, 5, 6])
CONFIGS = DATA[np.array(list(itertools.product(range(3), repeat=3)))]  # [27, 3] all sequences
ORDERS = list(itertools.permutations(range(3)))


# ---------------------------------------------------------------------------------------------
# helpers: a known joint over 27 sequences, exact-conditional denoisers, exact enumeration
# ---------------------------------------------------------------------------------------------
def joint(seed, concentration=0.8):
  return np.random.default_rng(seed).dirichlet(np.full(27, concentration))


def conditional_logits(p_C, z_BxL):
  """log p(x_i = v | visible tokens of z) under the joint ``p_C`` over CONFIGS (jnp)."""
  cfg = jnp.asarray(CONFIGS)
  visible = (z_BxL != MASK)[:, None, :]
  compat_BxC = jnp.all(jnp.where(visible, cfg[None] == z_BxL[:, None, :], True), axis=-1)
  w_BxC = jnp.asarray(p_C, jnp.float32)[None, :] * compat_BxC
  onehot_CxLxV = (cfg[:, :, None] == jnp.arange(V)[None, None, :]).astype(jnp.float32)
  mass = jnp.einsum("bc,clv->blv", w_BxC, onehot_CxLxV)
  return jnp.where(mass > 0, jnp.log(jnp.maximum(mass, 1e-30)), -1e4)


def joint_denoiser(params, z_BxL, t_B):
  """params = (p1, p2): position 0 uses the exact conditionals of joint p1, positions 1 and 2
  those of joint p2. With p1 == p2 these are the exact conditionals of one joint; otherwise
  they are inconsistent (no joint has them as conditionals)."""
  pos0 = (jnp.arange(3) == 0)[None, :, None]
  return jnp.where(pos0, conditional_logits(params[0], z_BxL), conditional_logits(params[1], z_BxL))


def table_denoiser(params, z_BxL, t_B):
  """Ignores z: the logits are the table ``params`` ([1, L, V])."""
  return params + 0.0 * z_BxL[..., None]


def np_conditionals(p_C, z):
  """Numpy float64: p(x_i = v | visible tokens of z), by summing the joint over completions."""
  out = np.zeros((3, V))
  for cfg, pc in zip(CONFIGS, p_C):
    if all(zi == MASK or zi == ci for zi, ci in zip(z, cfg)):
      out[np.arange(3), cfg] += pc
  return out / out.sum(-1, keepdims=True)


def exact_elbo_and_loglik(p1, p2, x):
  """Any-order enumeration for ``joint_denoiser((p1, p2))``: the continuous-time reverse process
  reveals tokens one at a time in a uniformly random order, so the model's
  log p(x) = log mean_σ Π_j p(x_σj | x_σ<j) and its exact ELBO = mean_σ Σ_j log p(x_σj | x_σ<j)."""
  totals = []
  for order in ORDERS:
    z, total = np.full(3, MASK), 0.0
    for i in order:
      total += math.log(np_conditionals(p1 if i == 0 else p2, z)[i, x[i]])
      z[i] = x[i]
    totals.append(total)
  totals = np.array(totals)
  return totals.mean(), np.log(np.mean(np.exp(totals)))


@functools.lru_cache(maxsize=None)
def _compiled_elbo(fn, kw_items):
  kw = dict(kw_items)
  return jax.jit(lambda p, x, target, k: dm.elbo_logprob(fn, p, x, target, k, **kw))


def elbo(fn, params, x, target, key, **kw):
  """``dm.elbo_logprob`` compiled as a whole, one compilation per (denoiser, options)."""
  return _compiled_elbo(fn, tuple(sorted(kw.items())))(params, x, target, key)


class TinyMixer(nn.Module):
  """Embedding + one non-causal token-mixing layer + MLP: a small bidirectional backbone."""

  vocab: int
  length: int
  d: int = 16

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None, deterministic=True):
    h = nn.Embed(self.vocab, self.d)(tokens_BxL)
    h = h + self.param("pos", nn.initializers.normal(1.0), (self.length, self.d))[None]
    h = h + jnp.swapaxes(nn.Dense(self.length)(jnp.swapaxes(jnp.tanh(h), 1, 2)), 1, 2)
    h = h + nn.Dense(self.d)(nn.gelu(nn.Dense(2 * self.d)(h)))
    return nn.Dense(self.vocab)(h)


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
SCHEDULES = ["linear", "cosine", "polynomial:2", "polynomial:3.5"]


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_boundaries_derivative_and_weight(name):
  s = dm.as_schedule(name)
  np.testing.assert_allclose(float(s.alpha(0.0)), 1.0, atol=1e-6)
  np.testing.assert_allclose(float(s.alpha(1.0)), 0.0, atol=1e-6)
  t = np.linspace(0.05, 0.95, 19)
  h = 1e-3
  fd = (np.asarray(s.alpha(t + h), np.float64) - np.asarray(s.alpha(t - h), np.float64)) / (2 * h)
  np.testing.assert_allclose(np.asarray(s.dalpha(t)), fd, rtol=2e-3, atol=2e-3)
  assert np.all(np.diff(np.asarray(s.alpha(t))) < 0)  # strictly decreasing
  # the closed-form weight is -α'/(1-α), computed here from the formulas in float64
  if s.kind == "linear":
    a, da = 1 - t, -np.ones_like(t)
  elif s.kind == "cosine":
    a, da = 1 - np.cos(np.pi / 2 * (1 - t)), -np.pi / 2 * np.sin(np.pi / 2 * (1 - t))
  else:
    a, da = 1 - t**s.power, -s.power * t ** (s.power - 1)
  np.testing.assert_allclose(np.asarray(s.weight(t)), -da / (1 - a), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(s.alpha(t)), a, atol=1e-6)
  # reveal probability from t to s: (α_s - α_t) / (1 - α_t)
  np.testing.assert_allclose(
    float(s.reveal_probability(0.7, 0.4)),
    (float(s.alpha(0.4)) - float(s.alpha(0.7))) / (1 - float(s.alpha(0.7))),
    rtol=1e-5,
  )


def test_linear_weight_is_one_over_t():
  t = np.array([0.1, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(np.asarray(dm.MaskingSchedule("linear").weight(t)), 1 / t, rtol=1e-6)


def test_schedule_bad_values():
  with pytest.raises(ValueError, match="unknown masking schedule"):
    dm.as_schedule("sqrt")
  with pytest.raises(ValueError, match="power > 0"):
    dm.MaskingSchedule("polynomial", power=0.0)
  with pytest.raises(ValueError, match="bad schedule"):
    dm.as_schedule("polynomial:two")


# ---------------------------------------------------------------------------------------------
# forward process, substitution, pure loss
# ---------------------------------------------------------------------------------------------
def test_forward_mask_rate_and_prompt():
  x = jnp.full((4000, 8), 5, jnp.int32)
  target = jnp.asarray(np.tile([0, 0, 1, 1, 1, 1, 1, 1], (4000, 1)))
  for name, t in [("linear", 0.3), ("cosine", 0.3), ("polynomial:2", 0.6)]:
    z, masked = dm.forward_mask(
      jax.random.PRNGKey(0),
      x,
      jnp.full((4000,), t),
      schedule=name,
      mask_id=MASK,
      target_mask_BxL=target,
    )
    expected = {"linear": 0.3, "cosine": np.cos(np.pi / 2 * 0.7), "polynomial:2": 0.36}[name]
    rate = float(jnp.mean(masked[:, 2:]))
    assert abs(rate - expected) < 0.01, (name, rate, expected)
    assert not bool(jnp.any(masked[:, :2]))  # prompt never masked
    np.testing.assert_array_equal(np.asarray(z == MASK), np.asarray(masked))


def test_exact_k_mask_counts_and_weights():
  x = jnp.full((4, 7), 5, jnp.int32)
  target = jnp.asarray([[1, 1, 1, 1, 1, 0, 0]] * 3 + [[0] * 7])
  u = jnp.asarray([0.0, 0.5, 0.999, 0.3])
  z, masked, w = dm.exact_k_mask(jax.random.PRNGKey(1), x, target, u, mask_id=MASK)
  np.testing.assert_array_equal(np.asarray(masked.sum(-1)), [1, 3, 5, 0])  # k = floor(u n) + 1
  np.testing.assert_allclose(np.asarray(w), [5.0, 5 / 3, 1.0, 0.0], rtol=1e-6)
  assert not bool(jnp.any(masked & (target == 0)))
  np.testing.assert_array_equal(np.asarray(z == MASK), np.asarray(masked))


def test_substitution_parameterization():
  rng = np.random.default_rng(0)
  raw = rng.normal(size=(2, 3, V)).astype(np.float32)
  z = np.array([[MASK, 4, MASK], [6, MASK, 5]])
  probs = np.asarray(jax.nn.softmax(dm.substitution_logits(jnp.asarray(raw), z, mask_id=MASK)))
  for b in range(2):
    for i in range(3):
      if z[b, i] == MASK:
        e = np.exp(raw[b, i].astype(np.float64))
        e[MASK] = 0
        np.testing.assert_allclose(probs[b, i], e / e.sum(), rtol=1e-5, atol=1e-7)
      else:
        np.testing.assert_array_equal(probs[b, i], np.eye(V)[z[b, i]])


def test_diffusion_loss_hand_computed():
  rng = np.random.default_rng(1)
  raw = rng.normal(size=(2, 4, V)).astype(np.float32)
  x = np.array([[4, 5, 6, 4], [6, 6, 5, 4]])
  z = np.array([[MASK, 5, MASK, 4], [6, MASK, MASK, MASK]])
  t = np.array([0.25, 0.8], np.float32)
  want = []
  for b in range(2):
    ce = 0.0
    for i in range(4):
      if z[b, i] == MASK:
        logits = np.delete(raw[b, i].astype(np.float64), MASK)
        ce += np.log(np.exp(logits).sum()) - raw[b, i, x[b, i]]
    want.append(ce / t[b])  # linear schedule: weight 1/t on the masked-token cross-entropy
  got = dm.diffusion_loss(raw, x, z, jnp.asarray(t), schedule="linear", mask_id=MASK)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  got_cos = dm.diffusion_loss(raw, x, z, jnp.asarray(t), schedule="cosine", mask_id=MASK)
  w_cos = np.pi / 2 * np.tan(np.pi / 2 * (1 - t))
  np.testing.assert_allclose(np.asarray(got_cos), np.array(want) * t * w_cos, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# ELBO estimators against exact enumeration
# ---------------------------------------------------------------------------------------------
ESTIMATORS = [("time", "linear"), ("time", "cosine"), ("time", "polynomial:3"), ("exact_k", None)]


@pytest.mark.parametrize("estimator,schedule", [("time", "cosine"), ("exact_k", None)])
def test_elbo_of_a_denoiser_that_knows_the_data_is_zero(estimator, schedule):
  seq = jnp.asarray([[4, 6, 5, 5, 4, 6]])
  target = jnp.ones_like(seq)
  onehot = jax.nn.one_hot(seq, V)
  kw = dict(num_samples=64, mask_id=MASK, estimator=estimator, schedule=schedule or "linear")
  perfect = jnp.where(onehot > 0, 0.0, -1e4)  # all mass on the one training sequence
  est = elbo(table_denoiser, perfect, seq, target, jax.random.PRNGKey(0), **kw)
  np.testing.assert_allclose(np.asarray(est), [0.0], atol=1e-5)
  # a denoiser with 90% on the true token is clearly below zero: the check can fail
  soft = jnp.log(0.9 * onehot + 0.1 / 6 * (1 - onehot))
  assert float(elbo(table_denoiser, soft, seq, target, jax.random.PRNGKey(0), **kw)[0]) < -0.3


def _tight_kw(estimator, schedule):
  # the time estimator's 1/t-type weights make it far noisier than exact-k masking (measured
  # max error over the 27 rows at N = 20000: ~0.1-0.2 nats vs ~0.03), hence two tolerances
  kw = dict(num_samples=20000, samples_per_call=4000, mask_id=MASK, estimator=estimator)
  return kw | dict(schedule=schedule or "linear"), (0.08 if estimator == "exact_k" else 0.3)


@pytest.mark.parametrize("estimator,schedule", ESTIMATORS)
def test_elbo_is_tight_for_exact_conditionals_and_bounds_the_nll(estimator, schedule):
  x = jnp.asarray(CONFIGS)  # all 27 sequences
  target = jnp.ones_like(x)
  kw, tol = _tight_kw(estimator, schedule)
  p, q = joint(0, 2.0), joint(2, 2.0)
  # exact conditionals of a known joint: -ELBO ≈ NLL = -log p(x), for every schedule
  est = np.asarray(elbo(joint_denoiser, (p, p), x, target, jax.random.PRNGKey(3), **kw))
  np.testing.assert_allclose(-est, -np.log(p), atol=tol)
  assert abs(np.mean(est - np.log(p))) < tol / 5
  # inconsistent conditionals: the model's exact NLL (any-order enumeration) is < exact -ELBO;
  # the Monte Carlo -ELBO matches the exact -ELBO, hence is >= NLL - tolerance
  exact = np.array([exact_elbo_and_loglik(p, q, row) for row in CONFIGS])
  elbo_exact, loglik = exact[:, 0], exact[:, 1]
  np.testing.assert_allclose(np.exp(loglik).sum(), 1.0, rtol=1e-6)  # a distribution over x
  assert np.all(loglik - elbo_exact >= -1e-9)
  gap = np.mean(loglik - elbo_exact)
  assert gap > 0.05, gap
  est = np.asarray(elbo(joint_denoiser, (p, q), x, target, jax.random.PRNGKey(4), **kw))
  np.testing.assert_allclose(est, elbo_exact, atol=tol)
  assert abs(np.mean(est - elbo_exact)) < tol / 5
  assert np.all(-est >= -loglik - tol)
  assert np.mean(-est) > np.mean(-loglik) + gap / 2


def test_enumeration_helper_recovers_the_joint():
  p = joint(2)
  for row, pc in zip(CONFIGS[:5], p[:5]):
    elbo_exact, loglik = exact_elbo_and_loglik(p, p, row)
    np.testing.assert_allclose([elbo_exact, loglik], [np.log(pc)] * 2, rtol=1e-9)


def test_prompt_positions_are_neither_masked_nor_scored():
  p = joint(3)
  x = jnp.asarray(CONFIGS)
  target = jnp.asarray(np.tile([0, 1, 1], (27, 1)))  # position 0 is a prompt
  kw, _ = _tight_kw("exact_k", None)
  est = elbo(joint_denoiser, (p, p), x, target, jax.random.PRNGKey(0), **kw)
  p3 = p.reshape(3, 3, 3)
  cond = (p3 / p3.sum(axis=(1, 2), keepdims=True)).reshape(-1)  # p(x1, x2 | x0)
  np.testing.assert_allclose(np.asarray(est), np.log(cond), atol=0.05)
  assert not np.allclose(np.asarray(est), np.log(p), atol=0.3)  # differs from the joint


# ---------------------------------------------------------------------------------------------
# paired (shared-noise) estimator and the model wrapper
# ---------------------------------------------------------------------------------------------
def _random_params(model, length, seed, scale=0.5):
  """Parameters drawn with numpy for the backbone's parameter shapes (no XLA compilation)."""
  shapes = jax.eval_shape(lambda k: model.init(k, length=length), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def _model_and_params(length=6):
  model = dm.DiffusionLM(TinyMixer(V, length), vocab_size=V)
  pol = _random_params(model, length, 0)
  noise = _random_params(model, length, 1, scale=0.05)
  return model, pol, jax.tree.map(jnp.add, pol, noise)


def test_shared_masks_reduce_variance_of_policy_minus_reference():
  model, pol, ref = _model_and_params()
  x = jnp.asarray(np.random.default_rng(0).integers(4, 7, size=(4, 6)))
  target = jnp.asarray(np.tile([0, 1, 1, 1, 1, 1], (4, 1)))
  keys = jax.random.split(jax.random.PRNGKey(5), 64)
  paired = jax.jit(
    jax.vmap(
      lambda a, b, k: model.paired_logprob(a, b, x, target, k, num_samples=2),
      in_axes=(None, None, 0),
    )
  )
  shared_pol, shared_ref = paired(pol, ref, keys)
  other_pol, other_ref = paired(pol, ref, jax.random.split(jax.random.PRNGKey(6), 64))
  d_shared = shared_pol - shared_ref
  d_indep = shared_pol - other_ref  # policy and reference estimated with independent draws
  var_shared = float(jnp.mean(jnp.var(d_shared, axis=0)))
  var_indep = float(jnp.mean(jnp.var(d_indep, axis=0)))
  assert var_indep >= 2 * var_shared, (var_indep, var_shared)
  print(
    f"variance of the policy-reference difference: independent {var_indep:.1f}, shared "
    f"{var_shared:.1f} ({var_indep / var_shared:.0f}x lower)"
  )
  # both estimate the same difference
  np.testing.assert_allclose(
    np.asarray(d_shared.mean(0)), np.asarray(d_indep.mean(0)), atol=4 * math.sqrt(var_indep / 64)
  )
  # identical parameters give identical estimates: the draws are shared
  same_a, same_b = paired(pol, pol, keys)
  np.testing.assert_array_equal(same_a, same_b)
  assert not np.allclose(shared_pol, other_pol)  # and different keys give different draws


def test_paired_estimator_makes_the_draws_of_elbo_logprob():
  # same shapes and options as the perfect-denoiser test, so the elbo compilation is shared
  seq = jnp.asarray([[4, 6, 5, 5, 4, 6]])
  target = jnp.asarray([[0, 1, 1, 1, 1, 1]])
  tables = [
    jnp.asarray(np.random.default_rng(i).normal(size=(1, 6, V)), jnp.float32) for i in (0, 1)
  ]
  kw = dict(num_samples=64, mask_id=MASK, estimator="time", schedule="cosine")
  key = jax.random.PRNGKey(8)
  pol, ref = jax.jit(
    lambda a, b: dm.paired_elbo_logprob(table_denoiser, a, b, seq, target, key, **kw)
  )(*tables)
  np.testing.assert_allclose(
    pol, elbo(table_denoiser, tables[0], seq, target, key, **kw), rtol=1e-5
  )
  np.testing.assert_allclose(
    ref, elbo(table_denoiser, tables[1], seq, target, key, **kw), rtol=1e-5
  )


def test_gradients_flow_to_policy_only():
  model, pol, ref = _model_and_params()
  x = jnp.asarray(np.random.default_rng(1).integers(4, 7, size=(2, 6)))
  target = jnp.ones_like(x)

  def f(p_pol, p_ref):
    lp, lr = model.paired_logprob(p_pol, p_ref, x, target, jax.random.PRNGKey(0), num_samples=2)
    return jnp.sum(lp - lr)

  g_pol, g_ref = jax.jit(jax.grad(f, argnums=(0, 1)))(pol, ref)
  leaves = jax.tree.leaves(g_pol)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_ref))


def test_training_on_one_sequence_drives_the_elbo_to_zero():
  length = 5
  model = dm.DiffusionLM(TinyMixer(V, length), vocab_size=V, schedule="cosine")
  params = _random_params(model, length, 2, scale=0.3)
  x = jnp.tile(jnp.asarray([[4, 6, 5, 5, 6]]), (16, 1))
  target = jnp.ones_like(x)
  opt = optax.adam(3e-2)

  def step(carry, key):
    params, opt_state = carry
    loss, g = jax.value_and_grad(lambda p: jnp.mean(model.loss(p, x, target, key)))(params)
    updates, opt_state = opt.update(g, opt_state)
    return (optax.apply_updates(params, updates), opt_state), loss

  train = jax.jit(lambda p, keys: jax.lax.scan(step, (p, opt.init(p)), keys)[1])
  losses = np.asarray(train(params, jax.random.split(jax.random.PRNGKey(0), 60)))
  # the per-sequence -ELBO (batch mean, t stratified over the batch) starts near
  # L·log(V - 1) ≈ 9.7 nats and must approach 0 for a one-sequence dataset
  assert losses[0] > 5.0 and losses[-10:].mean() < 0.05, (losses[:10], losses[-10:])


def test_prefix_layout():
  inputs = jnp.asarray([[5, 6, 0], [7, 0, 0]])
  targets = jnp.asarray([[4, 1, 0], [4, 5, 1]])
  layout = jax.jit(dm.prefix_layout, static_argnames=("target_len", "mask_id", "score_padding"))
  tokens, mask = layout(inputs, targets)
  np.testing.assert_array_equal(tokens, [[5, 6, 2, 4, 1, 0, 0], [7, 2, 4, 5, 1, 0, 0]])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0]])
  _, mask = layout(inputs, targets, score_padding=False)
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0]])
  canvas, mask = layout(inputs, target_len=2, mask_id=MASK)
  np.testing.assert_array_equal(canvas, [[5, 6, 2, 7, 7, 0], [7, 2, 7, 7, 0, 0]])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]])


def test_bad_inputs_raise_clear_errors():
  model = dm.DiffusionLM(TinyMixer(V, 6), vocab_size=V)
  params = jax.eval_shape(lambda k: model.init(k, length=6), jax.random.PRNGKey(0))  # shapes only
  x = np.full((2, 6), 4)
  ones = np.ones_like(x)
  with_mask = x.copy()
  with_mask[0, 2] = MASK
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="special token"):
    dm.DiffusionLM(TinyMixer(V, 6), vocab_size=V, mask_id=1)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    dm.DiffusionLM(TinyMixer(V, 6), vocab_size=V, mask_id=V)
  with pytest.raises(ValueError, match="backbone returned"):
    jax.eval_shape(dm.DiffusionLM(TinyMixer(V, 6), vocab_size=V + 1).raw_logits, params, x)
  with pytest.raises(ValueError, match="num_samples"):
    model.logprob(params, x, ones, key, num_samples=0)
  with pytest.raises(ValueError, match="target_mask shape"):
    model.logprob(params, x, ones[:, :3], key)
  with pytest.raises(ValueError, match="contain mask_id"):
    model.logprob(params, with_mask, ones, key)
  with pytest.raises(ValueError, match="unknown ELBO estimator"):
    model.logprob(params, x, ones, key, estimator="importance")
  with pytest.raises(ValueError, match="do not match tokens"):
    dm.substitution_logits(np.zeros((2, 5, V)), x, mask_id=MASK)
  with pytest.raises(ValueError, match="t must be"):
    dm.forward_mask(key, x, np.ones((3,)), schedule="linear", mask_id=MASK)
