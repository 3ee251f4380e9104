"""Block diffusion: block-causal masks, AR adaptation (shift), cached block decoding, EOS rule.

Ground truths: the causal transformer (block length 1 + shift + causal prompt must be it, token
for token), the full-sequence block-causal denoiser (the KV-cached sampler must reproduce its
decoding), and hand-built denoisers whose outputs can be written down.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax.decoding import diffusion_sampling as ds
from slicjax.models import diffusion as dm
from slicjax.models import diffusion_seq, seq_model
from slicjax.models.transformer import TransformerConfig, TransformerLM

VOCAB = 20  # tokenizer vocabulary; the diffusion backbone has VOCAB + 1 rows (MASK = VOCAB)
CFG = dict(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
           num_layers=2, max_len=64)


def _ar_model_and_params(seed=0):
  cfg = TransformerConfig(**CFG)
  ar = seq_model.PrefixLM(TransformerLM(cfg), cfg.max_len, VOCAB)
  params = ar.init(jax.random.PRNGKey(seed))
  # scale the weights up so that the random model is confident enough to be interesting
  params = jax.tree.map(lambda x: 2.0 * x, params)
  return ar, params


def _diffusion(block_length, shift=True, causal_prompt=True, **kw):
  d = dict(CFG, block_length=block_length, shift=shift, causal_prompt=causal_prompt, **kw)
  return diffusion_seq.build(d)


def _ragged_inputs():
  inputs = np.zeros((3, 6), np.int32)
  inputs[0, :6] = [5, 6, 7, 8, 9, 10]
  inputs[1, :2] = [11, 4]
  inputs[2, :4] = [4, 12, 13, 6]
  return jnp.asarray(inputs)


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def test_block_ids_by_hand():
  # prompt of 2 tokens, total length 10, canvas 6, blocks of 2
  s = jnp.array([2])
  ids = np.asarray(dm.block_ids(s, 10, block_length=2, canvas_len=6))[0]
  # no shift: prompt + BOS (positions 0..2) block 0, slots at 3..8 in blocks 11, 11, 12, ...
  np.testing.assert_array_equal(ids, [0, 0, 0, 11, 11, 12, 12, 13, 13, 40])
  ids = np.asarray(dm.block_ids(s, 10, block_length=2, canvas_len=6, shift=True))[0]
  # shift: position 2 (BOS) gives slot 0's logits, so the blocks start one position earlier
  np.testing.assert_array_equal(ids, [0, 0, 11, 11, 12, 12, 13, 13, 40, 40])
  ids = np.asarray(dm.block_ids(s, 10, block_length=2, canvas_len=6, causal_prompt=True))[0]
  np.testing.assert_array_equal(ids[:3], [0, 1, 2])


def test_block_length_one_with_shift_and_causal_prompt_is_the_causal_mask():
  s = jnp.array([0, 3, 5])
  ids = dm.block_ids(s, 12, block_length=1, shift=True, causal_prompt=True)
  causal = np.tril(np.ones((12, 12), bool))
  np.testing.assert_array_equal(np.asarray(dm.block_causal_mask(ids)), np.stack([causal] * 3))


def test_anneal_mask_endpoints_and_rate():
  ids = dm.block_ids(jnp.array([3, 1]), 40, block_length=8)
  final = dm.block_causal_mask(ids)
  causal = np.tril(np.ones((40, 40), bool))[None]
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(np.asarray(dm.anneal_mask(key, final, 0.0)), final & causal)
  np.testing.assert_array_equal(np.asarray(dm.anneal_mask(key, final, 1.0)), final)
  half = np.asarray(dm.anneal_mask(key, final, 0.3))
  extra = np.asarray(final) & ~causal
  assert np.all(half <= np.asarray(final)) and np.all(half[np.broadcast_to(causal, half.shape)
                                                          & np.asarray(final)])
  assert abs(half[extra].mean() - 0.3) < 0.05


def test_explicit_causal_mask_equals_the_causal_transformer():
  cfg = TransformerConfig(**CFG)
  module = TransformerLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 3, VOCAB)
  params = module.init(jax.random.PRNGKey(0), tokens)["params"]
  want = module.apply({"params": params}, tokens)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((11, 11), bool)), (2, 11, 11))
  bidir = TransformerLM(TransformerConfig(**dict(CFG, causal=False)))
  got = bidir.apply({"params": params}, tokens, attention_mask_BxLxL=mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # and the mask matters: the bidirectional model differs
  assert not np.allclose(bidir.apply({"params": params}, tokens), want, atol=1e-3)


def test_decode_chunk_against_the_cache_equals_the_full_sequence_pass():
  """A chunk run in decode mode with a chunk mask sees every cached slot before it: the same
  outputs as the full-sequence pass with the matching block-causal mask."""
  cfg = TransformerConfig(**dict(CFG, causal=False, max_len=16))
  module = TransformerLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 3, VOCAB)
  params = module.init(jax.random.PRNGKey(0), tokens)["params"]
  # blocks: [0, 4) bidirectional prompt, [4, 8), [8, 12)
  ids = jnp.asarray([0] * 4 + [1] * 4 + [2] * 4)[None].repeat(2, 0)
  full = module.apply({"params": params}, tokens, attention_mask_BxLxL=dm.block_causal_mask(ids))
  cache = module.init(jax.random.PRNGKey(0), tokens[:, :1], decode=True,
                      attention_mask_BxLxL=jnp.ones((2, 1, 1), bool))["cache"]
  cache = jax.tree.map(jnp.zeros_like, cache)
  ones = jnp.ones((2, 4, 4), bool)
  outs = []
  for k in range(3):
    out, mut = module.apply({"params": params, "cache": cache}, tokens[:, 4 * k: 4 * k + 4],
                            decode=True, attention_mask_BxLxL=ones, mutable=["cache"])
    cache = mut["cache"]
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# AR initialization
# ---------------------------------------------------------------------------------------------
def test_ar_initialized_shift_model_reproduces_the_ar_logits():
  ar, ar_params = _ar_model_and_params()
  model = _diffusion(block_length=1)
  params = dm.params_from_autoregressive(ar_params)
  assert params["token_embed"]["embedding"].shape == (VOCAB + 1, CFG["d_model"])
  inputs = _ragged_inputs()
  targets = jnp.asarray([[7, 8, 1, 0], [9, 1, 0, 0], [4, 5, 6, 1]], jnp.int32)
  want, _ = ar.target_logits(ar_params, {"inputs": inputs, "targets": targets})
  x, tmask = dm.prefix_layout(inputs, targets)
  got = model.lm.raw_logits(params, x, attention_mask_BxLxL=model.lm.final_mask(tmask, 4))
  s_B = jnp.sum(inputs != 0, axis=1)
  got = jnp.take_along_axis(got, (s_B[:, None] + 1 + jnp.arange(4)[None, :])[:, :, None], axis=1)
  real = np.asarray(targets) != 0
  np.testing.assert_allclose(np.asarray(got)[..., :VOCAB][real], np.asarray(want)[real],
                             rtol=1e-4, atol=1e-4)
  # an untied head gains a zero [MASK] column
  untied = dm.params_from_autoregressive({"token_embed": {"embedding": jnp.ones((5, 3))},
                                          "head": {"lm_head": {"kernel": jnp.ones((3, 5))}}})
  assert untied["head"]["lm_head"]["kernel"].shape == (3, 6)
  np.testing.assert_array_equal(untied["head"]["lm_head"]["kernel"][:, 5], 0.0)


def _ar_greedy(ar, params, inputs, length):
  """Reference AR greedy decoding by full recomputation, with the samplers' EOS rule (PAD's
  probability counted as EOS's, PAD never chosen; stop at EOS)."""
  b = inputs.shape[0]
  out = np.zeros((b, length), np.int32)
  done = np.zeros(b, bool)
  for j in range(length):
    logits, _ = ar.target_logits(params, {"inputs": inputs, "targets": jnp.asarray(out)})
    step = np.asarray(logits[:, j], np.float64).copy()
    step[:, 1] = np.logaddexp(step[:, 1], step[:, 0])
    step[:, 0] = -np.inf
    tok = step.argmax(-1)
    out[:, j] = np.where(done, 0, tok)
    done |= tok == 1
  return out


def test_block_length_one_greedy_is_ar_greedy():
  ar, ar_params = _ar_model_and_params()
  model = _diffusion(block_length=1)
  params = dm.params_from_autoregressive(ar_params)
  inputs = _ragged_inputs()
  want = _ar_greedy(ar, ar_params, inputs, 8)
  got, stats = jax.jit(functools.partial(model.sample, max_len=8))(
    params, inputs, jax.random.PRNGKey(0)
  )
  np.testing.assert_array_equal(np.asarray(got), want)
  assert np.asarray(stats.row_evals_B).max() <= 8
  np.testing.assert_array_equal(stats.real_tokens_B, (want != 0).sum(1))


# ---------------------------------------------------------------------------------------------
# cached block sampler == uncached block-causal sampler
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("rule,kw", [("threshold", dict(threshold=0.5)),
                                     ("factor", dict(factor=1.0)),
                                     ("topk", dict(steps_per_block=2))])
def test_cached_block_sampler_equals_the_uncached_sampler(shift, rule, kw):
  model = _diffusion(block_length=4, shift=shift, causal_prompt=False)
  params = model.lm.init(jax.random.PRNGKey(3), length=20)
  params = jax.tree.map(lambda x: 3.0 * x, params)
  inputs = _ragged_inputs()
  length = 8
  got, stats = jax.jit(functools.partial(ds.cached_block_sample, model.lm, target_len=length,
                                         rule=rule, **kw))(params, inputs, jax.random.PRNGKey(0))
  x, tmask = dm.prefix_layout(inputs, target_len=length, mask_id=model.lm.mask_id)
  denoise = model.lm.denoiser(params, tmask, length)
  fn = {"threshold": ds.confidence_threshold_sample, "factor": ds.confidence_factor_sample,
        "topk": ds.low_confidence_remasking_sample}[rule]
  ref, ref_stats = jax.jit(functools.partial(fn, denoise, mask_id=model.lm.mask_id,
                                             block_length=4, **kw))(
    x, tmask == 0, jax.random.PRNGKey(0))
  s_B = jnp.sum(inputs != 0, axis=1)
  idx = s_B[:, None] + 1 + jnp.arange(length)[None, :]
  ref_gen = np.asarray(jnp.take_along_axis(ref, idx, axis=1))
  np.testing.assert_array_equal(np.asarray(got), ref_gen)
  ref_steps = np.asarray(jnp.take_along_axis(ref_stats.commit_step_BxL, idx, axis=1))
  # the same commit order per row (steps are counted per row in the reference loop, in
  # lockstep per block in the cached one): compare dense ranks of the commit steps
  for b in range(3):
    dense = lambda v: np.unique(v, return_inverse=True)[1]
    np.testing.assert_array_equal(dense(np.asarray(stats.commit_step_BxL)[b]),
                                  dense(ref_steps[b]))
  np.testing.assert_array_equal(stats.real_tokens_B, ref_stats.real_tokens_B)
  np.testing.assert_array_equal(stats.row_evals_B, ref_stats.row_evals_B)
  assert not np.any(np.asarray(got) == model.lm.mask_id)
  if rule != "topk":
    assert np.asarray(stats.row_evals_B).min() < length  # some parallel commits happened


def test_cached_block_sampler_bad_inputs():
  model = _diffusion(block_length=3)
  with pytest.raises(ValueError, match="multiple of the model's block_length"):
    ds.cached_block_sample(model.lm, None, _ragged_inputs(), jax.random.PRNGKey(0), target_len=8)
  with pytest.raises(ValueError, match="not block-causal"):
    ds.cached_block_sample(_diffusion(block_length=0).lm, None, _ragged_inputs(),
                           jax.random.PRNGKey(0), target_len=8)
  with pytest.raises(ValueError, match="unknown rule"):
    ds.cached_block_sample(model.lm, None, _ragged_inputs(), jax.random.PRNGKey(0),
                           target_len=9, rule="beam")


# ---------------------------------------------------------------------------------------------
# EOS rule on a hand-built denoiser
# ---------------------------------------------------------------------------------------------
def _tail_padding_denoise(z_BxL, t_B):
  """Slots 1-3: token 7 (p ~ 0.95); slots 4+: PAD (p ~ 0.99), the padding is the most confident."""
  b, length = z_BxL.shape
  head = (jnp.arange(length) >= 1) & (jnp.arange(length) <= 3)
  logits = jnp.full((b, length, 10), -5.0)
  logits = logits.at[:, :, 7].set(jnp.broadcast_to(jnp.where(head, 4.0, 1.0)[None], (b, length)))
  return logits.at[:, :, 0].set(jnp.broadcast_to(jnp.where(head, 1.0, 6.0)[None], (b, length)))


def _one_prompt_token():
  tokens = np.zeros((1, 8), np.int32)
  tokens[0, 0] = 5
  fixed = np.zeros((1, 8), bool)
  fixed[0, 0] = True
  return tokens, fixed


def test_pad_mass_moves_to_eos_at_masked_slots():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 10))
  masked = jnp.asarray([[True, False, True, True, False]] * 2)
  got = jax.nn.softmax(ds._ban_pad(logits, masked, True), axis=-1)
  p = jax.nn.softmax(logits, axis=-1)
  m = np.asarray(masked)
  np.testing.assert_allclose(np.asarray(got)[m][:, 1], np.asarray(p[..., 0] + p[..., 1])[m],
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[m][:, 0], 0.0)
  np.testing.assert_allclose(np.asarray(got)[~m], np.asarray(p)[~m], rtol=1e-6)


def test_eos_rule_never_fills_the_padding_first():
  tokens, fixed = _one_prompt_token()
  for fn, kw in [(ds.confidence_threshold_sample, dict(threshold=0.9)),
                 (ds.low_confidence_remasking_sample, {})]:
    out, stats = fn(_tail_padding_denoise, tokens, fixed, jax.random.PRNGKey(0), mask_id=9, **kw)
    np.testing.assert_array_equal(np.asarray(out)[0], [5, 7, 7, 7, 1, 0, 0, 0])
    assert int(stats.real_tokens_B[0]) == 4
    # without the rule the output never ends with EOS
    out, stats = fn(_tail_padding_denoise, tokens, fixed, jax.random.PRNGKey(0), mask_id=9,
                    eos_fill=False, **kw)
    np.testing.assert_array_equal(np.asarray(out)[0], [5, 7, 7, 7, 0, 0, 0, 0])
  # ... and one token per step commits the padding first
  np.testing.assert_array_equal(np.asarray(stats.commit_step_BxL)[0], [-1, 4, 5, 6, 0, 1, 2, 3])


def test_eos_fill_commits_the_slots_after_eos_in_the_same_step():
  tokens, fixed = _one_prompt_token()
  # one token per step, most confident first: EOS at slot 4 (PAD's mass) fills 5..7 with PAD
  out, stats = ds.low_confidence_remasking_sample(
    _tail_padding_denoise, tokens, fixed, jax.random.PRNGKey(0), mask_id=9)
  np.testing.assert_array_equal(np.asarray(stats.commit_step_BxL)[0], [-1, 1, 2, 3, 0, 0, 0, 0])
  assert int(stats.num_evals) == 4
  np.testing.assert_array_equal(stats.row_evals_B, [4])


# ---------------------------------------------------------------------------------------------
# wiring: decoding API and the adaptation loss
# ---------------------------------------------------------------------------------------------
def test_generate_uses_the_cached_block_sampler():
  model = _diffusion(block_length=4, shift=False, causal_prompt=False, sampler="factor",
                     sampler_factor=1.5)
  params = jax.tree.map(lambda x: 3.0 * x, model.lm.init(jax.random.PRNGKey(3), length=20))
  inputs = _ragged_inputs()
  res = model.generate(params, inputs, method="greedy", max_len=8)
  want, _ = ds.cached_block_sample(model.lm, params, inputs, jax.random.PRNGKey(0), target_len=8,
                                   rule="factor", factor=1.5)
  np.testing.assert_array_equal(np.asarray(res.tokens_BxKxL)[:, 0], np.asarray(want))
  assert np.asarray(res.logp_BxK).shape == (3, 1)


def test_annealed_loss_reaches_the_final_mask():
  from slicjax.pipelines import diffusion_adapt

  model = _diffusion(block_length=4)
  _, ar_params = _ar_model_and_params()
  params = dm.params_from_autoregressive(ar_params)
  batch = {"inputs": _ragged_inputs(),
           "targets": jnp.asarray([[7, 8, 1, 0], [9, 1, 0, 0], [4, 5, 6, 1]], jnp.int32)}

  class State:
    def __init__(self, step):
      self.step = jnp.asarray(step)

  fn = diffusion_adapt.annealed_loss_fn(model, anneal_steps=10)
  key = jax.random.PRNGKey(5)
  loss0, m0 = fn(params, batch, key, State(0))
  loss5, m5 = fn(params, batch, key, State(5))
  loss_end, m_end = fn(params, batch, key, State(10))
  assert float(m0["anneal_p"]) == 0.0 and float(m5["anneal_p"]) == 0.5
  assert float(m_end["anneal_p"]) == 1.0
  plain = diffusion_adapt.annealed_loss_fn(model, anneal_steps=0)(params, batch, key, State(0))[0]
  np.testing.assert_allclose(float(loss_end), float(plain), rtol=1e-6)
  assert float(loss0) != float(plain)  # the causal start differs from the block-causal mask
  with pytest.raises(ValueError, match="anneal_steps"):
    diffusion_adapt.annealed_loss_fn(model, anneal_steps=-1)


def test_build_rejects_bad_diffusion_keys():
  with pytest.raises(ValueError, match="unknown model.sampler"):
    _diffusion(block_length=4, sampler="beam")
  with pytest.raises(ValueError, match="block_length must be >= 0"):
    _diffusion(block_length=-1)
