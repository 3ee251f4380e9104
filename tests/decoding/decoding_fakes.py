"""A tiny hand-made step model and exhaustive-enumeration ground truth for the decoding tests.

The model's logits depend on the whole prefix (a running hash kept in the cache), on the position
and on a float state ``[B, 3]``, so a beam whose cache rows are reordered wrongly gets different
logits and the comparison with enumeration fails.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

PAD, EOS, BOS = 0, 1, 2
HASH = 1009


def make_params(seed=0, vocab=4, scale=1.5, eos_bias=0.0):
  r = np.random.RandomState(seed)
  table = r.randn(HASH, vocab) * scale
  table[:, EOS] += eos_bias
  return {
    "table": jnp.asarray(table, jnp.float32),
    "pos": jnp.asarray(r.randn(64, vocab) * 0.5, jnp.float32),
    "emb": jnp.asarray(r.randn(vocab, 3), jnp.float32),
    "w": jnp.asarray(r.randn(3, vocab) * 0.5, jnp.float32),
  }


def make_step(params):
  def step(tokens_B, cache):
    h_B = (cache["hash"] * 5 + tokens_B + 1) % HASH
    state_Bx3 = 0.5 * cache["state"] + params["emb"][tokens_B]
    logits_BxV = params["table"][h_B] + params["pos"][cache["pos"]] + state_Bx3 @ params["w"]
    return logits_BxV, {"hash": h_B, "pos": cache["pos"] + 1, "state": state_Bx3}

  return step


def make_inputs(batch, seed=1):
  """Distinct start tokens and caches per row (as if each had its own prompt)."""
  r = np.random.RandomState(seed)
  init_B = jnp.asarray(r.randint(2, 4, size=batch), jnp.int32)
  cache = {
    "hash": jnp.asarray(r.randint(0, HASH, size=batch), jnp.int32),
    "pos": jnp.zeros((batch,), jnp.int32),
    "state": jnp.asarray(r.randn(batch, 3), jnp.float32),
  }
  return init_B, cache


def take_rows(init_B, cache, rows):
  rows = np.asarray(rows)
  return init_B[rows], jax.tree.map(lambda x: x[rows], cache)


class FakeModel:
  """Implements ``decode_state`` for ``slicjax.decoding.api.decode``."""

  def decode_state(self, params, inputs_BxS, max_len):
    s = inputs_BxS.shape[1]
    weights = jnp.arange(1, s + 1, dtype=jnp.int32)
    cache = {
      "hash": jnp.sum(inputs_BxS * weights[None, :], axis=1) % HASH,
      "pos": jnp.zeros((inputs_BxS.shape[0],), jnp.int32),
      "state": 0.1 * inputs_BxS[:, :3].astype(jnp.float32),
    }
    return make_step(params), jnp.full((inputs_BxS.shape[0],), BOS, jnp.int32), cache


def teacher_forced_logp(step, init_B, cache, tokens_BxKxL, lengths_BxK):
  """Raw model log-probability of given candidates (summed up to each length), float64."""
  b, k, length = tokens_BxKxL.shape
  c = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
  tok = jnp.repeat(init_B, k)
  toks = np.asarray(tokens_BxKxL).reshape(b * k, length)
  lens = np.asarray(lengths_BxK).reshape(b * k)
  total = np.zeros(b * k)
  for t in range(length):
    logits, c = step(tok, c)
    lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
    total += np.where(t < lens, lp[np.arange(b * k), toks[:, t]], 0.0)
    tok = jnp.asarray(toks[:, t])
  return total.reshape(b, k)


def has_repeated_ngram(seq, n):
  grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
  return len(grams) != len(set(grams))


def enumerate_hypotheses(step, init_B, cache, vocab, max_len, *, min_len=0, ngram=0):
  """Every hypothesis per row: ``[(tokens tuple, raw logp, length), ...]``.

  A hypothesis ends at its first EOS or at ``max_len``; those containing PAD or violating the
  min-length or n-gram constraints are dropped.
  """
  b = init_B.shape[0]
  seqs = np.array(list(itertools.product(range(vocab), repeat=max_len)), np.int32)
  m = len(seqs)
  c = jax.tree.map(lambda x: jnp.repeat(x, m, axis=0), cache)
  tok = jnp.repeat(init_B, m)
  all_seqs = np.tile(seqs, (b, 1))
  lp_steps = np.zeros((b * m, max_len))
  for t in range(max_len):
    logits, c = step(tok, c)
    lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
    lp_steps[:, t] = lp[np.arange(b * m), all_seqs[:, t]]
    tok = jnp.asarray(all_seqs[:, t])
  out = []
  for row in range(b):
    hyps = {}
    for i in range(m):
      seq = list(seqs[i])
      n = seq.index(EOS) + 1 if EOS in seq else max_len
      hyp = tuple(seq[:n])
      if hyp in hyps or PAD in hyp:  # pad_id is never generated
        continue
      if hyp[-1] == EOS and n < min_len:
        continue
      if ngram and has_repeated_ngram(hyp, ngram):
        continue
      hyps[hyp] = float(np.sum(lp_steps[row * m + i, :n]))
    out.append([(h, lp, len(h)) for h, lp in hyps.items()])
  return out


def penalty(length, alpha):
  return ((5.0 + length) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("fn", "kw"))
def _run_jit(fn, params, init_B, cache, rng, example_ids, kw):
  extra = {}
  if rng is not None:
    extra["rng"] = rng
  if example_ids is not None:
    extra["example_ids_B"] = example_ids
  return fn(make_step(params), init_B, cache, **extra, **dict(kw))


def run(fn, params, init_B, cache, *, rng=None, example_ids=None, **kw):
  """``fn(make_step(params), init_B, cache, **kw)`` under one cached ``jax.jit``.

  ``params`` is a jit argument, so runs that differ only in the model table share a program.
  """
  return _run_jit(fn, params, init_B, cache, rng, example_ids, tuple(sorted(kw.items())))
