"""Batched, exact speculative decoding: a small draft proposes, the target verifies in one pass.

One jit-compatible ``lax.while_loop`` over rounds. In each round every row (``B * K`` rows, K =
``num_samples``; rows ``b*K .. b*K+K-1`` belong to input ``b``) that is still running:

1. the draft proposes ``gamma`` tokens ``d_1 .. d_gamma`` autoregressively from its own cache
   (``gamma + 1`` draft steps: the last one feeds ``d_gamma`` so the draft cache also holds it
   when every proposal is accepted; its logits are unused);
2. the target scores ``[x, d_1 .. d_gamma]`` (``x``: the row's last token) in ONE decode-mode
   forward of ``gamma + 1`` tokens over its KV cache. The transformer's decode mode writes the
   new keys/values at each row's own ``cache_index`` and attends causally (slot ``<=`` query
   position), so position ``j`` of that pass gives exactly the logits of a one-token step after
   ``x, d_1 .. d_j``;
3. the row accepts its own prefix of the proposals and emits one more token (the correction or,
   when all ``gamma`` are accepted, a bonus token from the target's last position):

   * greedy (``temperature = 0``): ``d_j`` is accepted while it equals the target's argmax; the
     emitted tokens are the target's argmaxes, so the output is the target's greedy decode;
   * sampling: ``d_j ~ q_j`` is accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``; at the
     first rejection a token is drawn from ``normalize(max(0, p_j - q_j))``; after ``gamma``
     acceptances the bonus token is drawn from ``p_{gamma+1}``. ``p`` and ``q`` are the target's
     and the draft's distributions after the same processing as ``sampling.sample`` (constraints,
     temperature, top-k, top-p), so every emitted token follows the target's sampling
     distribution exactly (Leviathan et al. 2023; Chen et al. 2023);

4. caches are realigned per row: the target's (and a transformer draft's) write position is
   moved back to just after the accepted tokens. KV slots past it hold stale entries of rejected
   proposals, which are never read: decode-mode attention masks every slot after the query
   position, and the next round writes its own entries into those slots before attending. Every
   other cache leaf (an SSM's recurrent and convolution state, positions) is snapshotted after
   each draft step and the snapshot after the last accepted token is selected per row.

Rows finish independently at EOS or after ``max_len`` tokens; tokens after EOS are ``pad_id``
and the logit constraints (``pad_id`` never generated, ``min_len``, ``no_repeat_ngram_size``)
are those of ``sampling.py``, applied to both models at every proposed position.
``DecodeResult.logp_BxK`` is the raw (untempered) target log-probability of the emitted tokens,
taken from the verification pass. ``DecodeResult.stats`` holds a :class:`SpeculativeStats`.

The target must be a decoder-only transformer prefix LM (``PrefixLM`` over ``TransformerLM``);
the draft any decoder-only prefix LM (transformer or SSM) with the same vocabulary. Both caches
get ``gamma`` spare slots beyond the plain decode's (the module is re-instantiated with a larger
``max_len``; RoPE / relative / no positions only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from slicjax.decoding import sampling, types
from slicjax.decoding.types import DecodeResult, SpeculativeStats

_KV_LEAVES = ("cached_key", "cached_value")
_POSITION_LEAVES = ("cache_index", "position")
# Private, for tests only: deliberately wrong acceptance rules that the exactness test must catch.
_ACCEPT_RULES = ("exact", "always_accept", "resample_target")


def _leaf_name(path) -> str | None:
  return getattr(path[-1], "key", None)


def check_pair(target, draft) -> None:
  """Raises a ValueError naming the fix when ``(target, draft)`` cannot decode speculatively."""
  from slicjax.models.seq_model import PrefixLM
  from slicjax.models.transformer import TransformerLM

  if not isinstance(target, PrefixLM) or not isinstance(target.module, TransformerLM):
    raise ValueError(
      f"speculative decoding needs a decoder-only transformer target (a PrefixLM over "
      f"TransformerLM, e.g. build_model(dict(family='transformer', ...))), got "
      f"{type(target).__name__} over {type(getattr(target, 'module', None)).__name__}; decode "
      f"this model with method='greedy' or method='sample' instead."
    )
  if not target.module.cfg.causal:
    raise ValueError("speculative decoding needs a causal target (cfg.causal=True).")
  if not isinstance(draft, PrefixLM):
    raise ValueError(
      f"the draft must be a decoder-only prefix LM (transformer or SSM PrefixLM, e.g. from "
      f"build_model), got {type(draft).__name__}."
    )
  if draft.vocab_size != target.vocab_size:
    raise ValueError(
      f"draft vocab_size={draft.vocab_size} differs from the target's vocab_size="
      f"{target.vocab_size}; the draft must share the target's tokenizer and vocabulary (build "
      f"it with vocab_size={target.vocab_size}, e.g. a layer-truncated copy of the target)."
    )


def _process(logits_NxV, allowed_NxV, *, eos_id, temperature, top_k, top_p):
  """The logits a token is drawn from, as in ``sampling.sample``: constraints (EOS when nothing
  is allowed), then temperature, top-k and top-p (``temperature = 0``: constraints only)."""
  v = logits_NxV.shape[-1]
  x = jnp.where(allowed_NxV, logits_NxV, -jnp.inf)
  if 0 <= eos_id < v:
    none_N = ~jnp.any(allowed_NxV, axis=-1)
    eos_only_V = jnp.where(jnp.arange(v) == eos_id, 0.0, -jnp.inf)
    x = jnp.where(none_N[:, None], eos_only_V[None, :], x)
  if temperature > 0:
    x = x / temperature
    if top_k:
      x = jnp.where(sampling.top_k_mask(x, top_k), x, -jnp.inf)
    if top_p < 1.0:
      x = jnp.where(sampling.top_p_mask(x, top_p), x, -jnp.inf)
  return x


def _write_rows(buf_NxL, vals_NxM, start_N):
  """Writes ``vals_NxM[r]`` into ``buf_NxL[r]`` at column ``start_N[r]``."""
  return jax.vmap(lambda b, v, i: jax.lax.dynamic_update_slice(b, v, (i,)))(
    buf_NxL, vals_NxM, start_N
  )


def speculative_decode(
  target,
  target_params,
  draft,
  draft_params,
  inputs_BxS: jax.Array,
  *,
  max_len: int,
  num_draft: int = 4,
  num_samples: int = 1,
  temperature: float = 0.0,
  top_k: int | None = 0,
  top_p: float = 1.0,
  rng: jax.Array | None = None,
  example_ids_B: jax.Array | None = None,
  eos_id: int = 1,
  pad_id: int = 0,
  min_len: int = 0,
  no_repeat_ngram_size: int = 0,
  _accept_rule: str = "exact",
) -> DecodeResult:
  """Speculative decoding of ``inputs_BxS`` with ``target``, proposals from ``draft``.

  Call under ``jax.jit`` with the parameters as arguments (``api.decode(...,
  method="speculative")`` does this and caches the program).

  Args:
    target: decoder-only transformer adapter (``PrefixLM`` over ``TransformerLM``).
    target_params: its parameters.
    draft: decoder-only adapter (``PrefixLM``, transformer or SSM) with the target's vocabulary.
    draft_params: its parameters.
    inputs_BxS: int32 ``[B, S]`` left-aligned prompts, 0-padded.
    max_len: tokens to generate at most.
    num_draft: gamma, tokens the draft proposes per round (``>= 1``).
    num_samples: K candidates per input (K > 1 needs ``temperature > 0``).
    temperature: 0 = greedy (the output equals ``sampling.greedy_search`` of the target);
      ``> 0`` = exact sampling from the target's tempered / top-k / top-p distribution.
    top_k, top_p: as in ``sampling.sample`` (ignored when ``temperature = 0``).
    rng: PRNG key, required when ``temperature > 0``.
    example_ids_B: int ``[B]`` ids keying each input's randomness (default ``arange(B)``).
    eos_id, pad_id, min_len, no_repeat_ngram_size: as in ``sampling.greedy_search``.

  Returns:
    :class:`DecodeResult` with ``stats`` a :class:`SpeculativeStats`.
  """
  from slicjax.models import seq_model

  check_pair(target, draft)
  if _accept_rule not in _ACCEPT_RULES:
    raise ValueError(f"_accept_rule must be one of {_ACCEPT_RULES}, got {_accept_rule!r}.")
  if not isinstance(num_draft, int) or isinstance(num_draft, bool) or num_draft < 1:
    raise ValueError(f"num_draft (gamma) must be an int >= 1, got {num_draft!r}.")
  sampling._check_sampling_args(num_samples, temperature, top_k, top_p)
  greedy = temperature == 0
  if greedy and num_samples != 1:
    raise ValueError(
      f"num_samples={num_samples} needs temperature > 0 (greedy decoding gives one candidate)."
    )
  if not greedy and rng is None:
    raise ValueError("speculative sampling (temperature > 0) needs rng=jax.random.PRNGKey(...).")
  inputs_BxS = jnp.asarray(inputs_BxS)
  b, s = inputs_BxS.shape
  gamma = num_draft
  k = num_samples
  n = b * k
  width = max_len + gamma + 1  # token buffer with room for a whole round past max_len
  seq_model._check_len(
    s + target._sep + max_len,
    target.max_len,
    f"decoding (inputs {s} + {target._sep} + max_len {max_len})",
  )
  seq_model._check_len(
    s + draft._sep + max_len,
    draft.max_len,
    f"draft decoding (inputs {s} + {draft._sep} + max_len {max_len})",
  )
  tgt = target.with_capacity(s + target._sep + max_len + gamma)
  drf = draft.with_capacity(s + draft._sep + max_len + gamma)
  _, first_t_B, cache_t = tgt.decode_state(target_params, inputs_BxS, max_len + gamma)
  draft_step, first_d_B, cache_d = drf.decode_state(draft_params, inputs_BxS, max_len + gamma)
  types.check_decode_args(
    first_t_B,
    cache_t,
    max_len=max_len,
    min_len=min_len,
    eos_id=eos_id,
    pad_id=pad_id,
    no_repeat_ngram_size=no_repeat_ngram_size,
  )
  rep = lambda x: jnp.repeat(x, k, axis=0)
  cache_t, cache_d = jax.tree.map(rep, cache_t), jax.tree.map(rep, cache_d)
  v = target.vocab_size
  if greedy:
    keys_N = None
  else:
    keys_N = sampling.input_row_keys(rng, example_ids_B, b, k)

  process = lambda logits, allowed: _process(
    logits, allowed, eos_id=eos_id, temperature=temperature, top_k=top_k, top_p=top_p
  )

  def allowed_at(tokens_NxW, t_N):
    """``[N, V]`` allow-mask of each row's next token after its ``t_N`` generated tokens."""
    if no_repeat_ngram_size == 0:  # cheap path: the mask depends on the count only
      allowed = jnp.ones((tokens_NxW.shape[0], v), bool)
      if 0 <= pad_id < v:
        allowed = allowed.at[:, pad_id].set(False)
      if min_len > 0 and 0 <= eos_id < v:
        allowed = allowed.at[:, eos_id].set(t_N + 1 >= min_len)
      return allowed
    one = lambda row_W, t: sampling.allowed_tokens(
      row_W[None],
      t,
      v,
      eos_id=eos_id,
      pad_id=pad_id,
      min_len=min_len,
      no_repeat_ngram_size=no_repeat_ngram_size,
    )[0]
    return jax.vmap(one)(tokens_NxW, t_N)

  kv_flags = [
    _leaf_name(path) in _KV_LEAVES for path, _ in jax.tree_util.tree_flatten_with_path(cache_d)[0]
  ]
  cache_d_def = jax.tree.structure(cache_d)

  def snapshot(cache):
    leaves = jax.tree.leaves(cache)
    return [x for x, kv in zip(leaves, kv_flags) if not kv]

  def target_pass(tokens_NxM, cache):
    logits, mut = tgt.module.apply(
      {"params": target_params, "cache": cache}, tokens_NxM, decode=True, mutable=["cache"]
    )
    return logits.astype(jnp.float32), mut["cache"]

  def cond(st):
    return jnp.any(~st["finished"] & (st["t"] < max_len))

  def body(st):
    t_N = st["t"]
    active_N = ~st["finished"] & (t_N < max_len)
    if greedy:
      round_keys = None
    else:
      round_keys = jax.vmap(jax.random.fold_in)(st["keys"], t_N)

    # 1. draft proposals (gamma + 1 steps; the last only feeds d_gamma)
    def draft_body(carry, j):
      tok_N, cache, hist_NxW = carry
      logits_NxV, cache = draft_step(tok_N, cache)
      allowed_NxV = allowed_at(hist_NxW, t_N + j)
      q_NxV = process(logits_NxV.astype(jnp.float32), allowed_NxV)
      if greedy:
        d_N = jnp.argmax(q_NxV, axis=-1)
      else:
        draw = lambda key, row: jax.random.categorical(
          jax.random.fold_in(jax.random.fold_in(key, 0), j), row
        )
        d_N = jax.vmap(draw)(round_keys, q_NxV)
      d_N = d_N.astype(jnp.int32)
      hist_NxW = _write_rows(hist_NxW, d_N[:, None], t_N + j)
      return (d_N, cache, hist_NxW), (d_N, q_NxV, allowed_NxV, snapshot(cache))

    (_, cache_d_end, _), (d_GxN, q_GxNxV, allowed_GxNxV, snaps) = jax.lax.scan(
      draft_body, (st["last_d"], st["cache_d"], st["tokens"]), jnp.arange(gamma + 1)
    )
    drafts_NxG = d_GxN[:gamma].T

    # 2. one target pass over [x, d_1 .. d_gamma]
    fed_NxM = jnp.concatenate([st["last_t"][:, None], drafts_NxG], axis=1)
    logits_NxMxV, cache_t_new = target_pass(fed_NxM, st["cache_t"])
    allowed_NxMxV = jnp.transpose(allowed_GxNxV, (1, 0, 2))
    m = gamma + 1
    p_NxMxV = process(logits_NxMxV.reshape(n * m, v), allowed_NxMxV.reshape(n * m, v))
    p_NxMxV = p_NxMxV.reshape(n, m, v)

    # 3. acceptance
    if greedy:
      g_NxM = jnp.argmax(p_NxMxV, axis=-1).astype(jnp.int32)
      ok_NxG = drafts_NxG == g_NxM[:, :gamma]
    else:
      q_NxGxV = jnp.transpose(q_GxNxV[:gamma], (1, 0, 2))
      pp_NxMxV = jax.nn.softmax(p_NxMxV, axis=-1)
      qq_NxGxV = jax.nn.softmax(q_NxGxV, axis=-1)
      p_d_NxG = jnp.take_along_axis(pp_NxMxV[:, :gamma], drafts_NxG[..., None], axis=-1)[..., 0]
      q_d_NxG = jnp.take_along_axis(qq_NxGxV, drafts_NxG[..., None], axis=-1)[..., 0]
      u_NxG = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (gamma,)))(
        round_keys
      )
      ok_NxG = u_NxG * q_d_NxG < p_d_NxG
      if _accept_rule == "always_accept":
        ok_NxG = jnp.ones_like(ok_NxG)
    acc_N = jnp.sum(jnp.cumprod(ok_NxG.astype(jnp.int32), axis=1), axis=1)  # leading accepts
    if greedy:
      y_N = jnp.take_along_axis(g_NxM, acc_N[:, None], axis=1)[:, 0]
    else:
      p_at_NxV = jnp.take_along_axis(pp_NxMxV, acc_N[:, None, None], axis=1)[:, 0]
      q_pad_NxMxV = jnp.concatenate([qq_NxGxV, jnp.zeros((n, 1, v), jnp.float32)], axis=1)
      q_at_NxV = jnp.take_along_axis(q_pad_NxMxV, acc_N[:, None, None], axis=1)[:, 0]
      if _accept_rule == "resample_target":
        resid_NxV = p_at_NxV
      else:  # at acc = gamma q_at is 0: the bonus token is drawn from p itself
        resid_NxV = jnp.maximum(p_at_NxV - q_at_NxV, 0.0)
        resid_NxV = jnp.where(jnp.sum(resid_NxV, -1, keepdims=True) > 0, resid_NxV, p_at_NxV)
      log_r_NxV = jnp.where(resid_NxV > 0, jnp.log(jnp.maximum(resid_NxV, 1e-38)), -jnp.inf)
      draw = lambda key, row: jax.random.categorical(jax.random.fold_in(key, 2), row)
      y_N = jax.vmap(draw)(round_keys, log_r_NxV).astype(jnp.int32)

    # 4. emitted tokens, truncated at EOS and max_len
    j_M = jnp.arange(m)
    drafts_pad_NxM = jnp.concatenate([drafts_NxG, jnp.zeros((n, 1), jnp.int32)], axis=1)
    emit_NxM = jnp.where(j_M[None] < acc_N[:, None], drafts_pad_NxM, y_N[:, None])
    is_eos_NxM = emit_NxM == eos_id
    eos_before_NxM = (jnp.cumsum(is_eos_NxM, axis=1) - is_eos_NxM) > 0
    valid_NxM = (
      active_N[:, None]
      & (j_M[None] <= acc_N[:, None])
      & (t_N[:, None] + j_M[None] < max_len)
      & ~eos_before_NxM
    )
    count_N = jnp.sum(valid_NxM, axis=1).astype(jnp.int32)
    hit_eos_NxM = valid_NxM & is_eos_NxM
    newly_N = jnp.any(hit_eos_NxM, axis=1)
    eos_pos_N = t_N + jnp.argmax(hit_eos_NxM, axis=1).astype(jnp.int32) + 1
    tokens = _write_rows(st["tokens"], jnp.where(valid_NxM, emit_NxM, pad_id), t_N)
    raw_NxMxV = jax.nn.log_softmax(logits_NxMxV, axis=-1)
    tok_logp_NxM = jnp.take_along_axis(raw_NxMxV, jnp.clip(emit_NxM, 0, v - 1)[..., None], -1)
    logp_N = st["logp"] + jnp.sum(jnp.where(valid_NxM, tok_logp_NxM[..., 0], 0.0), axis=1)

    # 5. per-row cache realignment: both models keep x, d_1 .. d_acc (acc + 1 tokens)
    adv_N = jnp.where(active_N, acc_N + 1, 0)

    def fix_target(path, leaf):
      if _leaf_name(path) in _POSITION_LEAVES:
        return leaf + (adv_N - m).astype(leaf.dtype)
      return leaf

    cache_t_new = jax.tree_util.tree_map_with_path(fix_target, cache_t_new)
    before = snapshot(st["cache_d"])
    chosen, it = [], iter(zip(before, snaps))
    for leaf, kv in zip(jax.tree.leaves(cache_d_end), kv_flags):
      if kv:  # stale slots past the reset index are masked, then overwritten
        chosen.append(leaf)
        continue
      old, hist_G = next(it)
      all_Gp1 = jnp.concatenate([old[None], hist_G], axis=0)  # [gamma + 2, N, ...]
      chosen.append(jax.vmap(lambda a, i: a[i], in_axes=(1, 0))(all_Gp1, adv_N))
    cache_d_new = jax.tree.unflatten(cache_d_def, chosen)

    return dict(
      t=t_N + count_N,
      last_t=jnp.where(active_N, y_N, st["last_t"]),
      last_d=jnp.where(active_N, y_N, st["last_d"]),
      tokens=tokens,
      logp=logp_N,
      finished=st["finished"] | newly_N,
      lengths=jnp.where(newly_N, eos_pos_N, st["lengths"]),
      keys=st["keys"],
      cache_t=cache_t_new,
      cache_d=cache_d_new,
      accepted=st["accepted"] + jnp.where(active_N, acc_N, 0),
      proposed=st["proposed"] + jnp.where(active_N, gamma, 0),
      rounds=st["rounds"] + active_N.astype(jnp.int32),
      emitted=st["emitted"] + count_N,
      num_rounds=st["num_rounds"] + 1,
    )

  zeros_N = jnp.zeros((n,), jnp.int32)
  state = dict(
    t=zeros_N,
    last_t=rep(first_t_B.astype(jnp.int32)),
    last_d=rep(first_d_B.astype(jnp.int32)),
    tokens=jnp.full((n, width), pad_id, jnp.int32),
    logp=jnp.zeros((n,), jnp.float32),
    finished=jnp.zeros((n,), bool),
    lengths=zeros_N,
    keys=keys_N,
    cache_t=cache_t,
    cache_d=cache_d,
    accepted=zeros_N,
    proposed=zeros_N,
    rounds=zeros_N,
    emitted=zeros_N,
    num_rounds=jnp.zeros((), jnp.int32),
  )
  st = jax.lax.while_loop(cond, body, state)
  lengths_N = jnp.where(st["finished"], st["lengths"], max_len)
  logp_BxK = st["logp"].reshape(b, k)
  total = lambda x: jnp.sum(x).astype(jnp.float32)
  stats = SpeculativeStats(
    accepted_BxK=st["accepted"].reshape(b, k),
    proposed_BxK=st["proposed"].reshape(b, k),
    target_calls_BxK=st["rounds"].reshape(b, k),
    num_rounds=st["num_rounds"],
    acceptance_rate=total(st["accepted"]) / jnp.maximum(total(st["proposed"]), 1.0),
    tokens_per_target_call=total(st["emitted"]) / jnp.maximum(total(st["rounds"]), 1.0),
  )
  return DecodeResult(
    tokens_BxKxL=st["tokens"][:, :max_len].reshape(b, k, max_len),
    logp_BxK=logp_BxK,
    scores_BxK=logp_BxK,
    lengths_BxK=lengths_N.reshape(b, k),
    stats=stats,
  )


def layer_skip_draft(model, params, num_layers: int):
  """A "layer-skip" self-draft: the target's first ``num_layers`` blocks, its final norm and
  its output head (parameters shared, nothing trained).

  Args:
    model: a ``PrefixLM`` over ``TransformerLM``.
    params: its parameters.
    num_layers: blocks to keep, ``1 <= num_layers <= cfg.num_layers``.

  Returns:
    ``(draft_model, draft_params)`` for ``decode(..., method="speculative", draft=...)``.
  """
  from slicjax.models.seq_model import PrefixLM
  from slicjax.models.transformer import TransformerLM

  if not isinstance(model, PrefixLM) or not isinstance(model.module, TransformerLM):
    raise ValueError(
      f"layer_skip_draft needs a PrefixLM over TransformerLM, got {type(model).__name__}."
    )
  cfg = model.module.cfg
  if not isinstance(num_layers, int) or not 1 <= num_layers <= cfg.num_layers:
    raise ValueError(f"num_layers must be an int in [1, {cfg.num_layers}], got {num_layers!r}.")
  module = model.module.clone(cfg=dataclasses.replace(cfg, num_layers=num_layers))
  keep = {f"layer_{i}" for i in range(num_layers)} | {"final_norm"}
  unknown = set(params["decoder"]) - {f"layer_{i}" for i in range(cfg.num_layers)} - keep
  keep |= unknown  # anything else of the stack (e.g. shared position tables) is kept
  draft_params = {**params, "decoder": {k: v for k, v in params["decoder"].items() if k in keep}}
  return dataclasses.replace(model, module=module), draft_params
