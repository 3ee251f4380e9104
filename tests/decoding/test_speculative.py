"""Speculative decoding: greedy output equals the target's greedy decode; sampled tokens follow
the target's exact sampling distribution (chi-square against enumeration); errors; stats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from slicjax.decoding import api, sampling, speculative
from slicjax.models.factory import build_model

V = 8
EOS, PAD = 1, 0
PROMPTS = jnp.array([[5, 6, 7, 3, 4], [4, 3, 0, 0, 0], [6, 0, 0, 0, 0], [3, 4, 5, 6, 0]], jnp.int32)


@pytest.fixture(scope="module")
def models():
  target = build_model(dict(preset="tiny", vocab_size=V, max_len=24, num_layers=1))
  ssm = build_model(dict(family="ssm", preset="tiny", vocab_size=V, max_len=24, num_layers=1))
  init = jax.jit(target.init)
  pt = init(jax.random.PRNGKey(0))
  # a perturbed copy of the target: it agrees often but not always (partial acceptance)
  noise = jax.random.PRNGKey(5)
  perturb = lambda p: jax.tree.map(lambda x: x + 0.03 * jax.random.normal(noise, x.shape), p)
  pd = jax.jit(perturb)(pt)
  ps = jax.jit(ssm.init)(jax.random.PRNGKey(2))
  pr = init(jax.random.PRNGKey(9))  # an independent random draft
  return dict(target=(target, pt), tdraft=(target, pd), ssm=(ssm, ps), rdraft=(target, pr))


@pytest.fixture(scope="module")
def greedy_ref(models):
  target, pt = models["target"]
  ref = api.decode(target, pt, PROMPTS, method="greedy", max_len=10, eos_id=EOS, pad_id=PAD)
  lengths = np.asarray(ref.lengths_BxK[:, 0])
  # the batch covers ragged prompts and rows ending at different steps (or not at all)
  assert len(set(lengths.tolist())) >= 3, lengths
  return ref


@pytest.mark.parametrize(
  "draft,gamma,constrained",
  [
    ("tdraft", 1, False),
    ("tdraft", 3, False),
    ("ssm", 1, False),
    ("ssm", 3, True),
    ("target", 2, False),
  ],
)
def test_greedy_equals_target_greedy(models, greedy_ref, draft, gamma, constrained):
  """Token-for-token equal to plain greedy decoding; ``constrained``: with ``min_len`` and
  n-gram blocking, applied at every proposed position of every row."""
  target, pt = models["target"]
  kw = dict(max_len=10, eos_id=EOS, pad_id=PAD)
  if constrained:
    kw.update(min_len=3, no_repeat_ngram_size=2)
    greedy_ref = api.decode(target, pt, PROMPTS, method="greedy", **kw)
    assert int(jnp.min(greedy_ref.lengths_BxK)) >= 3
  got = api.decode(
    target,
    pt,
    PROMPTS,
    method="speculative",
    draft=models[draft],
    num_draft=gamma,
    **kw,
  )
  np.testing.assert_array_equal(got.tokens_BxKxL, greedy_ref.tokens_BxKxL)
  np.testing.assert_array_equal(got.lengths_BxK, greedy_ref.lengths_BxK)
  np.testing.assert_allclose(got.logp_BxK, greedy_ref.logp_BxK, atol=1e-4, rtol=1e-5)
  st = got.stats
  rate = float(st.acceptance_rate)
  if draft == "target":
    assert rate == 1.0
    assert float(st.tokens_per_target_call) > 2.0
  else:
    assert 0.0 < rate < 1.0, rate  # a partial acceptance exercises the per-row realignment
  assert int(jnp.sum(st.accepted_BxK)) <= int(jnp.sum(st.proposed_BxK))


def _exact_joint(target, pt, prompt_S, temperature, top_k, top_p):
  """Exact target distribution of the first two sampled tokens, by teacher-forced enumeration.

  Returns ``{(v1, v2): prob}`` (after EOS the second token is ``PAD``) and ``{(v1, v2): raw
  untempered target log-probability up to EOS}``."""
  v1_V = jnp.arange(V, dtype=jnp.int32)
  targets = jnp.stack([v1_V, jnp.zeros_like(v1_V)], axis=1)
  batch = {"inputs": jnp.repeat(prompt_S[None], V, axis=0), "targets": targets}
  logits_VxLxV, _ = jax.jit(target.target_logits)(pt, batch)

  def dist(logits_NxV):
    x = jnp.where(jnp.arange(V) == PAD, -jnp.inf, logits_NxV) / temperature
    if top_k:
      x = jnp.where(sampling.top_k_mask(x, top_k), x, -jnp.inf)
    if top_p < 1.0:
      x = jnp.where(sampling.top_p_mask(x, top_p), x, -jnp.inf)
    return np.asarray(jax.nn.softmax(x, axis=-1), np.float64)

  p1 = dist(logits_VxLxV[2:3, 0])[0]  # any row: position 0 sees only the prompt
  p2 = dist(logits_VxLxV[:, 1])
  raw_VxLxV = np.asarray(jax.nn.log_softmax(logits_VxLxV, axis=-1), np.float64)
  joint = {(EOS, PAD): p1[EOS]}
  raw_logp = {(EOS, PAD): raw_VxLxV[2, 0, EOS]}
  for a in range(V):
    if a not in (EOS, PAD):
      for c in range(V):
        joint[(a, c)] = p1[a] * p2[a, c]
        raw_logp[(a, c)] = raw_VxLxV[2, 0, a] + raw_VxLxV[a, 1, c]
  return joint, raw_logp


def _chi2_pvalue(samples_Nx2, joint):
  cells = sorted(joint)
  index = {c: i for i, c in enumerate(cells)}
  counts = np.zeros(len(cells))
  for a, c in map(tuple, samples_Nx2.tolist()):
    if joint.get((a, c), 0.0) == 0.0:
      return 0.0  # a sample the target cannot produce
    counts[index[(a, c)]] += 1
  n = counts.sum()
  expected = np.array([joint[c] for c in cells]) * n
  # merge cells expected < 5 into one bin (keeps the chi-square approximation valid)
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  return scipy_stats.chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue


@pytest.mark.parametrize("rule", ["exact", "always_accept", "resample_target"])
def test_sampling_matches_exact_target_distribution(models, rule):
  """10,000 draws of the first two tokens (one prompt, ``num_samples=10000``) against the exact
  target distribution; the two broken acceptance rules must fail the same test."""
  target, pt = models["target"]
  draft, pdraft = models["rdraft"]
  prompt_S = PROMPTS[0]
  num, temperature, top_k, top_p = 10000, 0.9, 6, 0.97
  opts = dict(
    max_len=2,
    num_draft=2,
    num_samples=num,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    eos_id=EOS,
    pad_id=PAD,
  )
  key = jax.random.PRNGKey(11)
  if rule == "exact":  # through the public API
    got = api.decode(
      target, pt, prompt_S[None], method="speculative", draft=(draft, pdraft), rng=key, **opts
    )
  else:
    run = jax.jit(
      lambda a, b, x, key: speculative.speculative_decode(
        target, a, draft, b, x, rng=key, _accept_rule=rule, **opts
      )
    )
    got = run(pt, pdraft, prompt_S[None], key)
  samples = np.asarray(got.tokens_BxKxL[0])
  joint, raw_logp = _exact_joint(target, pt, prompt_S, temperature, top_k, top_p)
  pvalue = _chi2_pvalue(samples, joint)
  if rule != "exact":
    assert pvalue < 1e-6, pvalue
    return
  assert pvalue > 0.01, pvalue
  rate = float(got.stats.acceptance_rate)
  assert 0.05 < rate < 0.95, rate  # the rule matters: drafts are neither always nor never kept
  # logp_BxK: the target's raw (untempered) log-probability of each sample, up to EOS
  want = np.array([raw_logp[tuple(x)] for x in samples.tolist()])
  np.testing.assert_allclose(np.asarray(got.logp_BxK[0]), want, atol=1e-4)
  lengths = np.where(samples[:, 0] == EOS, 1, 2)
  np.testing.assert_array_equal(np.asarray(got.lengths_BxK[0]), lengths)


def test_errors(models):
  target, pt = models["target"]
  ssm, ps = models["ssm"]
  with pytest.raises(ValueError, match="needs draft="):
    api.decode(target, pt, PROMPTS, method="speculative", num_draft=2, max_len=4)
  with pytest.raises(ValueError, match="needs the option"):
    api.decode(target, pt, PROMPTS, method="speculative", draft=(ssm, ps), max_len=4)
  with pytest.raises(ValueError, match="unknown option"):
    api.decode(
      target,
      pt,
      PROMPTS,
      method="speculative",
      draft=(ssm, ps),
      num_draft=2,
      max_len=4,
      beam_size=3,
    )
  with pytest.raises(ValueError, match="unknown option"):
    api.decode(target, pt, PROMPTS, method="greedy", draft=(ssm, ps), max_len=4)
  with pytest.raises(ValueError, match="decoder-only transformer target"):
    api.decode(ssm, ps, PROMPTS, method="speculative", draft=(target, pt), num_draft=2, max_len=4)
  other = build_model(dict(preset="tiny", vocab_size=V + 1, max_len=24, num_layers=1))
  with pytest.raises(ValueError, match="vocab_size"):
    api.decode(target, pt, PROMPTS, method="speculative", draft=(other, pt), num_draft=2, max_len=4)
  with pytest.raises(ValueError, match="needs rng"):
    api.decode(
      target,
      pt,
      PROMPTS,
      method="speculative",
      draft=(ssm, ps),
      num_draft=2,
      max_len=4,
      temperature=0.7,
    )
  with pytest.raises(ValueError, match="num_draft"):
    api.decode(target, pt, PROMPTS, method="speculative", draft=(ssm, ps), num_draft=0, max_len=4)


def test_program_cache_is_keyed_on_the_draft_model(models, monkeypatch):
  target, pt = models["target"]
  built = []

  def fake_build(*args):
    built.append(args)
    return lambda *a: None

  monkeypatch.setattr(api, "_build", fake_build)
  monkeypatch.setattr(api, "_COMPILED", {})
  for name in ("ssm", "tdraft", "target", "ssm"):
    api.decode(
      target, pt, PROMPTS, method="speculative", draft=models[name], num_draft=2, max_len=4
    )
  # one program per draft model; new draft parameters reuse it (they are a jit argument)
  assert [args[-1] for args in built] == [models["ssm"][0], models["target"][0]]
