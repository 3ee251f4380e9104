"""Masked diffusion samplers: coverage, prompts, commit rules (replayed), statistics, caching."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax.decoding import diffusion_sampling as ds
from slicjax.models import diffusion as dm

V, MASK, D, MAX_L = 12, 11, 16, 16
_R = np.random.default_rng(0)
EMB = jnp.asarray(_R.normal(size=(V, D)), jnp.float32)
POS = jnp.asarray(_R.normal(size=(MAX_L, D)), jnp.float32)
MIX = jnp.asarray(_R.normal(size=(MAX_L, MAX_L)), jnp.float32)
OUT = jnp.asarray(_R.normal(size=(D, V)), jnp.float32)


def random_denoise(z_BxL, t_B):
  """A fixed random bidirectional network: every position's logits depend on every token."""
  length = z_BxL.shape[1]
  h = EMB[z_BxL] + POS[None, :length]
  h = h + jnp.tanh(jnp.einsum("ij,bjd->bid", MIX[:length, :length], h) / np.sqrt(length))
  return 1.5 * jnp.einsum("bld,dv->blv", h, OUT) / np.sqrt(D)


@functools.lru_cache(maxsize=None)
def _compiled(sampler, denoise, kw_items):
  return jax.jit(functools.partial(sampler, denoise, **dict(kw_items)))


def run(sampler, tokens, fixed, key=0, denoise=random_denoise, **kw):
  """The sampler under jit (one compilation per sampler, denoiser and options). The EOS rule
  is off unless asked for: these tests check the commit rules on every token id."""
  kw.setdefault("eos_fill", False)
  fn = _compiled(sampler, denoise, tuple(sorted(kw.items())))
  tokens, stats = fn(jnp.asarray(tokens), jnp.asarray(fixed), jax.random.PRNGKey(key))
  return np.asarray(tokens), jax.tree.map(np.asarray, stats)


def prompt_setup():
  """Three rows of length 10: prompts of length 2 and 4, and scattered fixed positions."""
  fixed = np.zeros((3, 10), bool)
  fixed[0, :2] = True
  fixed[1, :4] = True
  fixed[2, [0, 3, 4, 8]] = True
  tokens = np.where(fixed, np.random.default_rng(1).integers(4, 11, size=(3, 10)), 0)
  return tokens, fixed


SAMPLERS = {
  "ancestral": (ds.ancestral_sample, dict(num_steps=16)),
  "ancestral_cosine": (ds.ancestral_sample, dict(num_steps=5, schedule="cosine")),
  "llada": (ds.low_confidence_remasking_sample, dict(block_length=4, steps_per_block=2)),
  "llada_sampled": (ds.low_confidence_remasking_sample, dict(temperature=1.0)),
  "threshold": (ds.confidence_threshold_sample, dict(threshold=0.6, block_length=4)),
  "prefix": (ds.confident_prefix_sample, dict(threshold=0.55, block_length=3)),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_fills_all_masks_and_respects_the_prompt(name):
  sampler, kw = SAMPLERS[name]
  tokens, fixed = prompt_setup()
  out, stats = run(sampler, tokens, fixed, mask_id=MASK, **kw)
  assert not np.any(out == MASK)
  np.testing.assert_array_equal(out[fixed], tokens[fixed])
  n_gen = (~fixed).sum(1)
  np.testing.assert_array_equal(stats.tokens_committed_B, n_gen)
  np.testing.assert_array_equal(stats.commit_step_BxL == -1, fixed)
  assert np.all(stats.commit_step_BxL[~fixed] >= 0)
  assert np.all(stats.commit_step_BxL[~fixed] < stats.num_steps)
  assert 1 <= stats.num_evals <= stats.num_steps
  np.testing.assert_allclose(stats.tokens_per_eval_B, n_gen / stats.num_evals, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# commit rules, checked by replaying each step with an independent numpy implementation
# ---------------------------------------------------------------------------------------------
def np_confidences(z):
  """Greedy token and its probability at every position (mask id excluded), float64."""
  logits = np.asarray(random_denoise(jnp.asarray(z), jnp.ones((z.shape[0],))), np.float64)
  logits[..., MASK] = -np.inf
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return p.argmax(-1), p.max(-1)


def expected_commits(rule, masked, conf, gen_idx, kw, llada_state):
  """The positions a step must commit, per the REFERENCE.md rules, for one row."""
  m = np.flatnonzero(masked)
  if m.size == 0:
    return set()
  block = kw.get("block_length") or len(masked)
  g0 = gen_idx[m].min()
  if rule == "prefix":
    window = [i for i in m if gen_idx[i] < g0 + block]
    window.sort(key=lambda i: gen_idx[i])
    out = {window[0]}
    for i in window:
      if conf[i] < kw["threshold"]:
        break
      out.add(i)
    return out
  window = [i for i in m if gen_idx[i] // block == g0 // block]
  best = max(window, key=lambda i: (conf[i], -i))
  if rule == "threshold":
    return {i for i in window if conf[i] >= kw["threshold"]} | {best}
  if rule == "factor":  # the largest n with (n + 1)(1 - c_(n)) < f, at least one
    ranked = sorted(window, key=lambda i: (-conf[i], i))
    n = max([j for j in range(1, len(ranked) + 1)
             if (j + 1) * (1 - conf[ranked[j - 1]]) < kw["factor"]], default=1)
    return set(ranked[:n])
  # low-confidence remasking: k = ceil(masks left in block / steps left in block)
  spb = kw.get("steps_per_block") or block
  blk = g0 // block
  done = llada_state.get("done", 0) if llada_state.get("block") == blk else 0
  k = -(-len(window) // (spb - done))
  llada_state.update(block=blk, done=done + 1)
  return set(sorted(window, key=lambda i: (-conf[i], i))[:k])


RULES = {
  "llada_blocks": (
    ds.low_confidence_remasking_sample,
    "topk",
    dict(block_length=4, steps_per_block=2),
  ),
  "llada_one_block": (ds.low_confidence_remasking_sample, "topk", dict(steps_per_block=3)),
  "threshold_blocks": (
    ds.confidence_threshold_sample,
    "threshold",
    dict(threshold=0.6, block_length=4),
  ),
  "threshold_one_block": (ds.confidence_threshold_sample, "threshold", dict(threshold=0.7)),
  "prefix": (ds.confident_prefix_sample, "prefix", dict(threshold=0.55, block_length=3)),
  "factor_blocks": (ds.confidence_factor_sample, "factor", dict(factor=1.2, block_length=4)),
  "factor_one_block": (ds.confidence_factor_sample, "factor", dict(factor=1.5)),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_confidence_samplers_follow_their_commit_rule(name):
  sampler, rule, kw = RULES[name]
  tokens, fixed = prompt_setup()
  out, stats = run(sampler, tokens, fixed, mask_id=MASK, **kw)
  steps = stats.commit_step_BxL
  gen_idx = np.cumsum(~fixed, axis=1) - 1
  states = [{} for _ in range(3)]
  sizes = []
  for s in range(int(stats.num_steps)):
    z = np.where(fixed | ((steps >= 0) & (steps < s)), out, MASK)
    greedy, conf = np_confidences(z)
    for b in range(3):
      got = set(np.flatnonzero(steps[b] == s))
      want = expected_commits(rule, z[b] == MASK, conf[b], gen_idx[b], kw, states[b])
      assert got == want, (name, s, b, got, want)
      np.testing.assert_array_equal(out[b, sorted(got)], greedy[b, sorted(got)])
      sizes.append(len(got))
  assert int(stats.num_evals) == int(stats.num_steps)  # every step changes z: nothing to reuse
  if rule != "topk":  # the thresholds were chosen so that both one and several tokens occur
    assert 1 in sizes and max(sizes) > 1, sizes


def test_semi_autoregressive_blocks_are_decoded_in_order():
  tokens, fixed = prompt_setup()
  _, stats = run(
    ds.low_confidence_remasking_sample,
    tokens,
    fixed,
    mask_id=MASK,
    block_length=4,
    steps_per_block=2,
  )
  gen_idx = np.cumsum(~fixed, axis=1) - 1
  for b in range(3):
    blocks = gen_idx[b][~fixed[b]] // 4
    step = stats.commit_step_BxL[b][~fixed[b]]
    for k in range(blocks.max()):
      assert step[blocks == k].max() < step[blocks == k + 1].min()
    # 2 steps per block, 2 tokens per step for full blocks
    assert len(set(step)) == 2 * (blocks.max() + 1) - (np.sum(blocks == blocks.max()) == 1)


def test_tau_one_commits_exactly_one_token_per_step():
  tokens, fixed = prompt_setup()
  n_gen = (~fixed).sum(1)
  _, conf = np_confidences(np.where(fixed, tokens, MASK))
  assert conf.max() < 0.99  # non-degenerate distributions
  for sampler, kw in [
    (ds.confidence_threshold_sample, dict(threshold=1.0)),
    (ds.confidence_threshold_sample, dict(threshold=1.0, block_length=3)),
    (ds.confident_prefix_sample, dict(threshold=1.0, block_length=4)),
  ]:
    _, stats = run(sampler, tokens, fixed, mask_id=MASK, **kw)
    for b in range(3):
      np.testing.assert_array_equal(
        np.sort(stats.commit_step_BxL[b][~fixed[b]]), np.arange(n_gen[b])
      )
    assert int(stats.num_evals) == n_gen.max()
    np.testing.assert_allclose(stats.tokens_per_eval_B, n_gen / n_gen.max())
  # the prefix sampler at τ = 1 decodes strictly left to right
  gen_idx = np.cumsum(~fixed, axis=1) - 1
  np.testing.assert_array_equal(stats.commit_step_BxL[~fixed], gen_idx[~fixed])
  # τ = 0 commits a whole block per step
  _, stats = run(
    ds.confidence_threshold_sample, tokens, fixed, mask_id=MASK, threshold=0.0, block_length=4
  )
  assert int(stats.num_evals) == -(-n_gen.max() // 4)


# ---------------------------------------------------------------------------------------------
# ancestral sampling reproduces the data distribution of an exact-conditional denoiser
# ---------------------------------------------------------------------------------------------
DATA = np.array([4, 5, 6])
CONFIGS = DATA[np.array(list(itertools.product(range(3), repeat=3)))]  # [27, 3]
P_JOINT = np.random.default_rng(7).dirichlet(np.full(27, 1.0))
CHI2_999 = {26: 54.052, 8: 26.124}  # chi-square quantiles at 0.999 (df = 26 and 8)


def joint_denoise(z_BxL, t_B):
  """Exact conditionals p(x_i | visible tokens) of the joint P_JOINT over CONFIGS."""
  cfg = jnp.asarray(CONFIGS)
  visible = (z_BxL != MASK)[:, None, :]
  compat_BxC = jnp.all(jnp.where(visible, cfg[None] == z_BxL[:, None, :], True), axis=-1)
  w_BxC = jnp.asarray(P_JOINT, jnp.float32)[None, :] * compat_BxC
  onehot = (cfg[:, :, None] == jnp.arange(V)[None, None, :]).astype(jnp.float32)
  mass = jnp.einsum("bc,clv->blv", w_BxC, onehot)
  return jnp.where(mass > 0, jnp.log(jnp.maximum(mass, 1e-30)), -1e4)


def chi2(counts, probs):
  expected = probs * counts.sum()
  return float(np.sum((counts - expected) ** 2 / expected))


def config_counts(out):
  idx = ((out - 4) * np.array([9, 3, 1])).sum(-1)
  return np.bincount(idx, minlength=27).astype(np.float64)


def test_ancestral_sampler_matches_the_joint_distribution():
  n = 10000
  out, stats = run(
    ds.ancestral_sample,
    np.zeros((n, 3), np.int32),
    np.zeros((n, 3), bool),
    key=3,
    denoise=joint_denoise,
    mask_id=MASK,
    num_steps=128,
  )
  counts = config_counts(out)
  assert chi2(counts, P_JOINT) < CHI2_999[26]
  # power check: the product of the marginals (what a factorized one-step sampler would give)
  # is rejected by the same statistic
  marg = [np.bincount(CONFIGS[:, i] - 4, weights=P_JOINT, minlength=3) for i in range(3)]
  product = np.array([marg[0][a - 4] * marg[1][b - 4] * marg[2][c - 4] for a, b, c in CONFIGS])
  assert chi2(counts, product) > 10 * CHI2_999[26]

  # conditional generation: position 0 fixed to token 5 -> samples follow p(x1, x2 | x0 = 5)
  tokens = np.zeros((n, 3), np.int32)
  tokens[:, 0] = 5
  fixed = np.zeros((n, 3), bool)
  fixed[:, 0] = True
  out, _ = run(
    ds.ancestral_sample, tokens, fixed, key=4, denoise=joint_denoise, mask_id=MASK, num_steps=128
  )
  assert np.all(out[:, 0] == 5)
  cond = P_JOINT[9:18] / P_JOINT[9:18].sum()
  assert chi2(config_counts(out)[9:18], cond) < CHI2_999[8]


# ---------------------------------------------------------------------------------------------
# caching and evaluation counts
# ---------------------------------------------------------------------------------------------
def counting(denoise):
  """Wraps a denoiser so each real evaluation bumps a host-side counter."""
  calls = []

  def fn(z, t):
    jax.debug.callback(lambda: calls.append(1))
    return denoise(z, t)

  return fn, calls


def test_cached_denoiser_outputs_equal_recomputation_with_fewer_evaluations():
  tokens, fixed = prompt_setup()
  results = {}
  for reuse in (True, False):
    fn, calls = counting(random_denoise)
    out, stats = run(
      ds.ancestral_sample,
      tokens,
      fixed,
      key=11,
      denoise=fn,
      mask_id=MASK,
      num_steps=64,
      reuse_cache=reuse,
    )
    assert len(calls) == int(stats.num_evals)  # the reported count is the real one
    results[reuse] = (out, stats)
  (out_c, st_c), (out_r, st_r) = results[True], results[False]
  np.testing.assert_array_equal(out_c, out_r)
  np.testing.assert_array_equal(st_c.commit_step_BxL, st_r.commit_step_BxL)
  assert int(st_r.num_evals) == int(st_r.num_steps) == int(st_c.num_steps)
  # with caching: one evaluation per step that follows a change (plus the first)
  distinct = len(set(st_c.commit_step_BxL[st_c.commit_step_BxL >= 0]))
  assert int(st_c.num_evals) <= distinct + 1 < int(st_r.num_evals)
  assert np.all(st_c.tokens_per_eval_B > st_r.tokens_per_eval_B)


def test_conditional_generation_on_a_prefix_layout():
  inputs = jnp.asarray([[5, 6, 7], [8, 0, 0]])
  canvas, target = dm.prefix_layout(inputs, target_len=4, mask_id=MASK)
  fixed = np.asarray(target) == 0
  out, stats = run(ds.confidence_threshold_sample, canvas, fixed, mask_id=MASK, threshold=0.5)
  np.testing.assert_array_equal(out[fixed], np.asarray(canvas)[fixed])  # prompt, BOS, padding
  np.testing.assert_array_equal(out[1, :2], [8, 2])
  assert not np.any(out == MASK)
  np.testing.assert_array_equal(stats.tokens_committed_B, [4, 4])


def test_bad_inputs_raise_clear_errors():
  tokens, fixed = prompt_setup()
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="fixed_mask the same shape"):
    ds.ancestral_sample(random_denoise, tokens, fixed[:, :5], key, mask_id=MASK, num_steps=4)
  with pytest.raises(ValueError, match="num_steps"):
    ds.ancestral_sample(random_denoise, tokens, fixed, key, mask_id=MASK, num_steps=0)
  with pytest.raises(ValueError, match="threshold"):
    ds.confidence_threshold_sample(random_denoise, tokens, fixed, key, mask_id=MASK, threshold=1.5)
  with pytest.raises(ValueError, match="block_length"):
    ds.confident_prefix_sample(random_denoise, tokens, fixed, key, mask_id=MASK, block_length=0)
  with pytest.raises(ValueError, match="temperature"):
    ds.low_confidence_remasking_sample(
      random_denoise, tokens, fixed, key, mask_id=MASK, temperature=-1.0
    )
  with pytest.raises(ValueError, match="V > mask_id"):
    ds.low_confidence_remasking_sample(random_denoise, tokens, fixed, key, mask_id=V)
