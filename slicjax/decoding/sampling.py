"""Greedy search and ancestral sampling (temperature, top-k, nucleus) over a ``tokens_to_logits`` step.

Both run one jit-compatible ``lax.while_loop`` over ``B * K`` rows (K = ``num_samples``; rows
``b*K .. b*K+K-1`` belong to input ``b``) and stop when every row has produced EOS or ``max_len``
tokens. Call them under ``jax.jit`` with the model parameters as jit arguments (``api.decode``
does this and caches the compiled program).

Logit processing at each step, in this order:

1. constraints: ``pad_id`` is never generated (it marks padding in every ``[..., L]`` tensor of
   slicjax, so a generated pad would make a candidate read as shorter; pass a ``pad_id`` outside
   ``[0, V)`` to allow every token); EOS is forbidden while fewer than ``min_len`` tokens would
   have been generated; with ``no_repeat_ngram_size = n > 0`` any token that would complete an
   n-gram already present in the row's generated tokens is forbidden (the init token is not part
   of the history);
2. temperature: ``logits / temperature`` (``temperature = 0`` means argmax, i.e. greedy);
3. top-k (:func:`top_k_mask`), then top-p (:func:`top_p_mask`) on the tempered, top-k-filtered
   distribution;
4. a token is drawn from the remaining tokens.

If the constraints forbid every token of a row, the row emits EOS and ends.

Log-probabilities returned (``DecodeResult.logp_BxK``) are always those of the model's own
untempered distribution, ``log_softmax(logits)``, at the chosen tokens, whatever temperature,
top-k, top-p or constraints were used: they are the numbers SLiC and the preference losses need.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from slicjax.decoding import types
from slicjax.decoding.types import DecodeResult, SamplingState


def top_k_mask(logits_NxV: jax.Array, k: int) -> jax.Array:
  """Boolean keep-mask of the ``k`` highest logits along the last axis.

  Ties: every token whose logit equals the k-th largest value is kept, so more than ``k`` tokens
  survive when the boundary value is shared (the result never depends on token order).
  ``k >= V`` keeps every token.

  Args:
    logits_NxV: ``[..., V]`` logits (``-inf`` allowed).
    k: number of tokens to keep, ``>= 1``.

  Returns:
    bool ``[..., V]``, True where the token is kept.
  """
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"top_k_mask needs an int k >= 1, got {k!r}; use k >= V to keep every token.")
  v = logits_NxV.shape[-1]
  if k >= v:
    return jnp.ones(logits_NxV.shape, bool)
  kth_N = jax.lax.top_k(logits_NxV, k)[0][..., k - 1]
  return logits_NxV >= kth_N[..., None]


def top_p_mask(logits_NxV: jax.Array, p: float) -> jax.Array:
  """Boolean keep-mask of the nucleus: the smallest set of most probable tokens with mass >= p.

  Tokens are sorted by probability (``softmax(logits)``) in descending order and kept while the
  mass of the tokens before them is ``< p``, so the most probable token is always kept. Ties:
  every token whose probability equals that of the least probable kept token is kept too (the
  set is closed under ties, independent of token order). ``p >= 1`` keeps every token, including
  zero-probability ones.

  Args:
    logits_NxV: ``[..., V]`` logits (``-inf`` allowed; such tokens have probability 0).
    p: nucleus mass in ``(0, 1]``.

  Returns:
    bool ``[..., V]``, True where the token is kept.
  """
  if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
    raise ValueError(f"top_p_mask needs p in (0, 1], got {p!r}; p = 1 keeps every token.")
  if p >= 1.0:
    return jnp.ones(logits_NxV.shape, bool)
  probs_NxV = jax.nn.softmax(logits_NxV.astype(jnp.float32), axis=-1)
  sorted_NxV = -jnp.sort(-probs_NxV, axis=-1)
  mass_before_NxV = jnp.cumsum(sorted_NxV, axis=-1) - sorted_NxV
  kept_sorted_NxV = mass_before_NxV < p
  # Probability of the least probable kept token (the kept tokens form a sorted prefix).
  threshold_N = jnp.min(jnp.where(kept_sorted_NxV, sorted_NxV, jnp.inf), axis=-1)
  return probs_NxV >= threshold_N[..., None]


def no_repeat_ngram_mask(tokens_NxL: jax.Array, num_generated, n: int, vocab_size: int):
  """Boolean allow-mask forbidding tokens that would repeat an n-gram of the history.

  Row ``r`` has generated ``tokens_NxL[r, :num_generated]``; token ``v`` is forbidden when
  ``(last n-1 generated tokens, v)`` equals an n-gram that occurs within those tokens. With
  ``n = 1`` every already generated token is forbidden.

  Args:
    tokens_NxL: int ``[N, L]`` generated tokens (anything after ``num_generated`` is ignored).
    num_generated: int scalar (may be traced): tokens generated so far, the same for every row.
    n: n-gram size ``>= 1`` (static).
    vocab_size: V.

  Returns:
    bool ``[N, V]``, True where the token is allowed.
  """
  if n < 1:
    raise ValueError(f"n-gram size must be >= 1, got {n}.")
  rows, length = tokens_NxL.shape
  num_windows = length - n + 1
  if num_windows <= 0:
    return jnp.ones((rows, vocab_size), bool)
  starts_W = jnp.arange(num_windows)
  # A window [i, i+n) counts only if its last token is already generated: i + n - 1 < t.
  valid_W = starts_W + (n - 1) < num_generated
  match_NxW = jnp.broadcast_to(valid_W[None, :], (rows, num_windows))
  if n > 1:
    offs = jnp.arange(n - 1)
    prefix_NxWxP = tokens_NxL[:, starts_W[:, None] + offs[None, :]]
    last_idx_P = jnp.clip(num_generated - (n - 1) + offs, 0, length - 1)
    last_NxP = tokens_NxL[:, last_idx_P]
    same_NxW = jnp.all(prefix_NxWxP == last_NxP[:, None, :], axis=-1)
    match_NxW = match_NxW & same_NxW
  next_NxW = tokens_NxL[:, starts_W + (n - 1)]
  # Out-of-range index vocab_size is dropped, so only matching windows write.
  target_NxW = jnp.where(match_NxW, next_NxW, vocab_size)
  row_NxW = jnp.broadcast_to(jnp.arange(rows)[:, None], (rows, num_windows))
  banned_NxV = jnp.zeros((rows, vocab_size), bool).at[row_NxW, target_NxW].set(True, mode="drop")
  return ~banned_NxV


def allowed_tokens(
  tokens_NxL,
  num_generated,
  vocab_size: int,
  *,
  eos_id: int,
  pad_id: int,
  min_len: int,
  no_repeat_ngram_size: int,
) -> jax.Array:
  """Boolean ``[N, V]`` allow-mask: no ``pad_id``, min length, n-gram blocking."""
  rows = tokens_NxL.shape[0]
  allowed_NxV = jnp.ones((rows, vocab_size), bool)
  if 0 <= pad_id < vocab_size:
    allowed_NxV = allowed_NxV.at[:, pad_id].set(False)
  if min_len > 0 and 0 <= eos_id < vocab_size:
    eos_ok = num_generated + 1 >= min_len
    allowed_NxV = allowed_NxV.at[:, eos_id].set(eos_ok)
  if no_repeat_ngram_size > 0:
    allowed_NxV = allowed_NxV & no_repeat_ngram_mask(
      tokens_NxL, num_generated, no_repeat_ngram_size, vocab_size
    )
  return allowed_NxV


def row_keys(rng, example_ids_B, num_samples: int):
  """``[B*K]`` keys: row ``b*K + k`` gets ``fold_in(fold_in(rng, example_ids_B[b]), k)``."""
  keys_B = jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_ids_B)
  ks = jnp.arange(num_samples)
  keys_BxK = jax.vmap(lambda key: jax.vmap(lambda k: jax.random.fold_in(key, k))(ks))(keys_B)
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), keys_BxK)


def input_row_keys(rng, example_ids_B, batch: int, num_samples: int):
  """:func:`row_keys` for ``batch`` inputs keyed by ``example_ids_B`` (default ``arange``),
  checking its shape."""
  if example_ids_B is None:
    example_ids_B = jnp.arange(batch, dtype=jnp.int32)
  example_ids_B = jnp.asarray(example_ids_B)
  if example_ids_B.shape != (batch,):
    raise ValueError(
      f"example_ids_B must have shape [B] = ({batch},), got {example_ids_B.shape}; pass one id "
      "per input."
    )
  return row_keys(rng, example_ids_B.astype(jnp.int32), num_samples)


def _loop(
  tokens_to_logits,
  init_tokens_B,
  cache,
  *,
  num_samples: int,
  max_len: int,
  eos_id: int,
  pad_id: int,
  min_len: int,
  no_repeat_ngram_size: int,
  keys_BK,
  choose: Callable,
) -> DecodeResult:
  b = init_tokens_B.shape[0]
  n = b * num_samples
  rep = lambda x: jnp.repeat(x, num_samples, axis=0)
  state = SamplingState(
    step=jnp.zeros((), jnp.int32),
    last_tokens_BK=rep(jnp.asarray(init_tokens_B, jnp.int32)),
    tokens_BKxL=jnp.full((n, max_len), pad_id, jnp.int32),
    logp_BK=jnp.zeros((n,), jnp.float32),
    finished_BK=jnp.zeros((n,), bool),
    lengths_BK=jnp.zeros((n,), jnp.int32),
    keys_BK=keys_BK,
    cache=jax.tree.map(rep, cache),
  )

  def cond(s: SamplingState):
    return (s.step < max_len) & ~jnp.all(s.finished_BK)

  def body(s: SamplingState) -> SamplingState:
    t = s.step
    logits_BKxV, new_cache = tokens_to_logits(s.last_tokens_BK, s.cache)
    logits_BKxV = logits_BKxV.astype(jnp.float32)
    v = logits_BKxV.shape[-1]
    allowed_BKxV = allowed_tokens(
      s.tokens_BKxL,
      t,
      v,
      eos_id=eos_id,
      pad_id=pad_id,
      min_len=min_len,
      no_repeat_ngram_size=no_repeat_ngram_size,
    )
    constrained_BKxV = jnp.where(allowed_BKxV, logits_BKxV, -jnp.inf)
    tok_BK = choose(constrained_BKxV, s.keys_BK, t).astype(jnp.int32)
    tok_BK = jnp.where(jnp.any(allowed_BKxV, axis=-1), tok_BK, eos_id)
    tok_BK = jnp.where(s.finished_BK, pad_id, tok_BK)
    logp_BKxV = jax.nn.log_softmax(logits_BKxV, axis=-1)
    tok_logp_BK = jnp.take_along_axis(logp_BKxV, jnp.clip(tok_BK, 0, v - 1)[:, None], axis=1)[:, 0]
    newly_BK = ~s.finished_BK & (tok_BK == eos_id)
    return SamplingState(
      step=t + 1,
      last_tokens_BK=tok_BK,
      tokens_BKxL=jax.lax.dynamic_update_slice(s.tokens_BKxL, tok_BK[:, None], (0, t)),
      logp_BK=s.logp_BK + jnp.where(s.finished_BK, 0.0, tok_logp_BK),
      finished_BK=s.finished_BK | newly_BK,
      lengths_BK=jnp.where(newly_BK, t + 1, s.lengths_BK),
      keys_BK=s.keys_BK,
      cache=new_cache,
    )

  s = jax.lax.while_loop(cond, body, state)
  lengths_BK = jnp.where(s.finished_BK, s.lengths_BK, max_len)
  k = num_samples
  logp_BxK = s.logp_BK.reshape(b, k)
  return DecodeResult(
    tokens_BxKxL=s.tokens_BKxL.reshape(b, k, max_len),
    logp_BxK=logp_BxK,
    scores_BxK=logp_BxK,
    lengths_BxK=lengths_BK.reshape(b, k),
  )


def greedy_search(
  tokens_to_logits: types.StepFn,
  init_tokens_B: jax.Array,
  cache: Any,
  *,
  max_len: int,
  eos_id: int = 1,
  pad_id: int = 0,
  min_len: int = 0,
  no_repeat_ngram_size: int = 0,
) -> DecodeResult:
  """Greedy decoding: the most likely allowed token at every step (first index on ties).

  Args:
    tokens_to_logits: the step ``(tokens_B, cache) -> (logits_BxV, new_cache)``.
    init_tokens_B: int32 ``[B]``, the first token fed to the step (BOS, last prompt token, ...).
    cache: the step's cache; every leaf has leading dimension B.
    max_len: tokens to generate at most (L of the result).
    eos_id: end-of-sequence id; rows stop after it.
    pad_id: written after EOS; never generated.
    min_len: EOS is forbidden until this many tokens (EOS included) can be reached.
    no_repeat_ngram_size: forbid tokens completing an n-gram already generated (0 = off).

  Returns:
    :class:`DecodeResult` with K = 1.
  """
  types.check_decode_args(
    init_tokens_B,
    cache,
    max_len=max_len,
    min_len=min_len,
    eos_id=eos_id,
    pad_id=pad_id,
    no_repeat_ngram_size=no_repeat_ngram_size,
  )
  choose = lambda logits_NxV, keys, t: jnp.argmax(logits_NxV, axis=-1)
  return _loop(
    tokens_to_logits,
    jnp.asarray(init_tokens_B),
    cache,
    num_samples=1,
    max_len=max_len,
    eos_id=eos_id,
    pad_id=pad_id,
    min_len=min_len,
    no_repeat_ngram_size=no_repeat_ngram_size,
    keys_BK=None,
    choose=choose,
  )


def _check_sampling_args(num_samples, temperature, top_k, top_p):
  if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
    raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
    raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}.")
  if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
    raise ValueError(f"top_k must be an int >= 0 (0 or None = off), got {top_k!r}.")
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}.")


def sample(
  tokens_to_logits: types.StepFn,
  init_tokens_B: jax.Array,
  cache: Any,
  *,
  rng: jax.Array,
  max_len: int,
  num_samples: int = 1,
  temperature: float = 1.0,
  top_k: int | None = 0,
  top_p: float = 1.0,
  example_ids_B: jax.Array | None = None,
  eos_id: int = 1,
  pad_id: int = 0,
  min_len: int = 0,
  no_repeat_ngram_size: int = 0,
) -> DecodeResult:
  """Ancestral sampling of ``num_samples`` candidates per input.

  The key of input ``b`` is ``jax.random.fold_in(rng, example_ids_B[b])``, of its sample ``k``
  ``fold_in(that, k)`` and of step ``t`` ``fold_in(that, t)``: the samples of an input depend only
  on ``rng``, its example id and its own tokens, never on the rest of the batch.

  Args:
    tokens_to_logits: the step ``(tokens_B, cache) -> (logits_BxV, new_cache)``.
    init_tokens_B: int32 ``[B]``, the first token fed to the step.
    cache: the step's cache; every leaf has leading dimension B.
    rng: a PRNG key (``jax.random.PRNGKey`` or ``jax.random.key``).
    max_len: tokens to generate at most.
    num_samples: K, candidates per input, returned in draw order (not sorted).
    temperature: divides the logits before drawing; 0 = argmax.
    top_k: keep the k most likely tokens (:func:`top_k_mask`); 0 or None = off.
    top_p: nucleus mass (:func:`top_p_mask`); 1 = off.
    example_ids_B: int ``[B]`` ids that key each input's randomness; default ``arange(B)``.
    eos_id, pad_id, min_len, no_repeat_ngram_size: as in :func:`greedy_search`.

  Returns:
    :class:`DecodeResult` with K = ``num_samples``; ``logp_BxK`` (= ``scores_BxK``) is the
    untempered model log-probability of each sample.
  """
  b = types.check_decode_args(
    init_tokens_B,
    cache,
    max_len=max_len,
    min_len=min_len,
    eos_id=eos_id,
    pad_id=pad_id,
    no_repeat_ngram_size=no_repeat_ngram_size,
  )
  _check_sampling_args(num_samples, temperature, top_k, top_p)
  if rng is None:
    raise ValueError("sample needs rng, e.g. rng=jax.random.PRNGKey(0).")
  keys_BK = input_row_keys(rng, example_ids_B, b, num_samples)

  def choose(logits_NxV, keys_N, t):
    if temperature == 0:
      return jnp.argmax(logits_NxV, axis=-1)
    scaled_NxV = logits_NxV / temperature
    if top_k:
      scaled_NxV = jnp.where(top_k_mask(scaled_NxV, top_k), scaled_NxV, -jnp.inf)
    if top_p < 1.0:
      scaled_NxV = jnp.where(top_p_mask(scaled_NxV, top_p), scaled_NxV, -jnp.inf)
    draw = lambda key, row_V: jax.random.categorical(jax.random.fold_in(key, t), row_V)
    return jax.vmap(draw)(keys_N, scaled_NxV)

  return _loop(
    tokens_to_logits,
    jnp.asarray(init_tokens_B),
    cache,
    num_samples=num_samples,
    max_len=max_len,
    eos_id=eos_id,
    pad_id=pad_id,
    min_len=min_len,
    no_repeat_ngram_size=no_repeat_ngram_size,
    keys_BK=keys_BK,
    choose=choose,
  )
