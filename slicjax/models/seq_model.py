"""Sequence-to-sequence adapters: one interface over every decoder family.

Losses consume log-likelihoods and decoding consumes a ``tokens_to_logits`` step; this module
turns a Flax module into both. Two shapes:

* :class:`PrefixLM` wraps a decoder-only LM (transformer or SSM). A seq2seq example becomes one
  sequence ``inputs + [BOS] + targets`` (models trained here), or ``inputs + targets`` with
  ``separator_id=None`` (pretrained models, whose prompt already ends the way the model was
  trained, e.g. with its chat template's assistant header); only target positions are scored.
* :class:`EncoderDecoder` wraps :class:`~slicjax.models.transformer.EncoderDecoderTransformer`;
  the decoder reads ``[decoder_start] + targets[:-1]`` and the encoder runs once per input (also
  when scoring K candidates per input).

Batches are dicts of int32 arrays: ``inputs`` ``[B, S]`` and ``targets`` ``[B, L]`` right-padded
with 0, targets ending in EOS; optionally packed (``*_segment_ids``, ``*_positions``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class SeqModel(abc.ABC):
  """Base adapter. Subclasses implement ``init_fn``, ``target_logits`` and ``decode_state``."""

  module: nn.Module
  max_len: int  # the module's maximum total sequence length
  vocab_size: int
  family: str = "transformer"

  # --- parameters ---------------------------------------------------------------------------
  @abc.abstractmethod
  def init_fn(self, batch_size: int = 1, input_len: int = 8, target_len: int = 8):
    """``rng -> boxed variables``: the function to ``jax.eval_shape`` / jit for sharded init."""

  def init(self, rng, **kw):
    return nn.unbox(self.init_fn(**kw)(rng))["params"]

  # --- teacher forcing ------------------------------------------------------------------------
  @abc.abstractmethod
  def target_logits(
    self, params, batch, *, return_hidden=False, deterministic=True, rngs=None
  ) -> tuple[jax.Array, jax.Array | None]:
    """Logits predicting each target token, ``[B, L, V]`` (and decoder states ``[B, L, D]``)."""

  def candidate_logits(
    self, params, inputs_BxS, candidates_BxKxL, *, return_hidden=False, deterministic=True,
    rngs=None,
  ):
    """Teacher-forced logits of K candidates per input: ``[B, K, L, V]`` (states ``[B,K,L,D]``)."""
    b, k, length = candidates_BxKxL.shape
    inputs = jnp.repeat(inputs_BxS, k, axis=0)
    logits, hidden = self.target_logits(
      params, {"inputs": inputs, "targets": candidates_BxKxL.reshape(b * k, length)},
      return_hidden=return_hidden, deterministic=deterministic, rngs=rngs,
    )
    logits = logits.reshape(b, k, length, -1)
    if hidden is not None:
      hidden = hidden.reshape(b, k, length, -1)
    return logits, hidden

  # --- decoding -------------------------------------------------------------------------------
  @abc.abstractmethod
  def decode_state(self, params, inputs_BxS, max_len: int) -> tuple[Callable, jax.Array, Any]:
    """``(tokens_to_logits, init_tokens_B, cache)`` for the algorithms in ``slicjax.decoding``."""

  def with_capacity(self, need: int) -> "SeqModel":
    """The adapter with a decode cache of ``need`` slots.

    A transformer module is re-instantiated with ``max_len=need`` (its KV cache, masks and cache
    buckets then span ``need`` slots: decoding a short request with a long-context model costs
    what the request needs, not the context); parameters are unchanged, so the same params
    apply. Learned position tables are parameters of shape ``[max_len, D]``, so such a module is
    kept (an error if ``need`` exceeds its table). An SSM cache has no length: only the
    adapter's bound changes.
    """
    module = self.module
    field = "cfg" if hasattr(module, "cfg") else "config"
    cfg = getattr(module, field, None)
    kv_cache = type(cfg).__name__ == "TransformerConfig"  # SSM states have no slots to size
    if kv_cache and cfg.max_len != need:
      if getattr(cfg, "position", None) == "learned":
        if need > cfg.max_len:
          raise ValueError(
            f"decoding needs {need} cache slots (prompt + max_len, + num_draft when "
            f"speculative) but the model has learned positions for only {cfg.max_len}; lower "
            f"max_len or num_draft."
          )
        return dataclasses.replace(self, max_len=max(self.max_len, need))
      module = module.clone(**{field: dataclasses.replace(cfg, max_len=need)})
    return dataclasses.replace(self, module=module, max_len=need)

  def _empty_cache(self, call, batch: int):
    """A zero cache for ``batch`` rows, built from shapes only (no parameter init compute)."""
    shapes = jax.eval_shape(call, jax.random.PRNGKey(0), jnp.zeros((batch, 1), jnp.int32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))


def _lengths(tokens_BxL):
  return jnp.sum((tokens_BxL != PAD_ID).astype(jnp.int32), axis=-1)


_POSITION_LEAVES = ("cache_index", "position")


def _set_cache_position(cache, n_B):
  """Sets every row's write position (KV ``cache_index``, stack ``position``) to ``n_B``."""

  def fix(path, leaf):
    name = getattr(path[-1], "key", None)
    if name in _POSITION_LEAVES:
      return jnp.broadcast_to(n_B, leaf.shape).astype(leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(fix, cache)


def _check_len(total: int, max_len: int, what: str):
  if total > max_len:
    raise ValueError(
      f"{what} needs {total} positions but the model's max_len is {max_len}; shorten the "
      f"inputs/targets (pipeline max lengths, decode max_len) or raise max_len in the model config."
    )


@dataclasses.dataclass(frozen=True)
class PrefixLM(SeqModel):
  """Decoder-only model used for seq2seq: ``inputs + [sep] + targets`` as one sequence.

  ``separator_id`` is the token placed between a prompt and its target (``BOS_ID`` for models
  trained by slicjax). ``None`` inserts nothing: the first target token is predicted from the
  last prompt token, which is how a pretrained LM continues text. Then every prompt must hold
  at least one token.
  """

  separator_id: int | None = BOS_ID
  # Write the prompt's cache in one forward pass when the module can (transformers); False
  # forces the one-token-at-a-time prefill every module supports.
  parallel_prefill: bool = True
  # candidate_logits runs each prompt once and the K candidates over its cache (decode-mode
  # forward) instead of K full copies of prompt + candidate; False forces the copies.
  shared_prefix_scoring: bool = True

  @property
  def _sep(self) -> int:
    return 0 if self.separator_id is None else 1

  def candidate_logits(
    self, params, inputs_BxS, candidates_BxKxL, *, return_hidden=False, deterministic=True,
    rngs=None,
  ):
    """Teacher-forced logits of K candidates per input, ``[B, K, L, V]`` (states ``[B,K,L,D]``).

    Shared prefix: the prompt is prefilled once per input (``decode_state``), its cache repeated
    K times, and the candidates run as one decode-mode forward of L tokens over it: ``B*S +
    B*K*L`` token positions instead of ``B*K*(S+L)``. Falls back to the copies for modules
    without ``prefill``, with active dropout, or with learned positions."""
    b, k, length = candidates_BxKxL.shape
    module = self.module
    field = "cfg" if hasattr(module, "cfg") else "config"
    cfg = getattr(module, field, None)
    rate = float(getattr(cfg, "dropout_rate", getattr(cfg, "dropout", 0.0)) or 0.0)
    shared = (
      self.shared_prefix_scoring and self.parallel_prefill
      and getattr(type(module), "parallel_prefill", False) and (deterministic or rate == 0.0)
      and getattr(cfg, "position", "rope") != "learned"
    )
    if not shared:
      return super().candidate_logits(
        params, inputs_BxS, candidates_BxKxL, return_hidden=return_hidden,
        deterministic=deterministic, rngs=rngs,
      )
    need = inputs_BxS.shape[1] + self._sep + length
    _check_len(need, self.max_len, f"scoring (inputs {inputs_BxS.shape[1]} + candidates)")
    small = self.with_capacity(need)  # a cache of `need` slots
    _, first_B, cache = small.decode_state(params, inputs_BxS, length)
    cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
    cands = candidates_BxKxL.reshape(b * k, length)
    tokens = jnp.concatenate([jnp.repeat(first_B, k)[:, None], cands[:, :-1]], axis=1)
    out, _ = small.module.apply(
      {"params": params, "cache": cache}, tokens, decode=True, deterministic=deterministic,
      return_hidden=return_hidden, mutable=["cache"], **({"rngs": rngs} if rngs else {}),
    )
    logits, hidden = out if return_hidden else (out, None)
    logits = logits.reshape(b, k, length, -1)
    if hidden is not None:
      hidden = hidden.reshape(b, k, length, -1)
    return logits, hidden

  def init_fn(self, batch_size: int = 1, input_len: int = 8, target_len: int = 8):
    tokens = jnp.zeros((batch_size, input_len + 1 + target_len), jnp.int32)
    return lambda rng: self.module.init(rng, tokens)

  def _layout(self, inputs_BxS, targets_BxL):
    b, s = inputs_BxS.shape
    length = targets_BxL.shape[1]
    sep = self._sep
    total = s + sep + length
    _check_len(
      total, self.max_len, f"a prefix-LM sequence (inputs {s} + {sep} + targets {length})"
    )
    s_B = _lengths(inputs_BxS)
    l_B = _lengths(targets_BxL)
    j = jnp.arange(total)[None, :]
    t_idx = jnp.clip(j - s_B[:, None] - sep, 0, length - 1)
    from_inputs = jnp.take_along_axis(inputs_BxS, jnp.clip(j, 0, s - 1) + 0 * t_idx, axis=1)
    from_targets = jnp.take_along_axis(targets_BxL, t_idx, axis=1)
    if sep:
      from_targets = jnp.where(j == s_B[:, None], self.separator_id, from_targets)
    tokens = jnp.where(j < s_B[:, None], from_inputs, from_targets)
    valid = j < (s_B + sep + l_B)[:, None]
    tokens = jnp.where(valid, tokens, PAD_ID)
    # Logits at position p predict token p + 1: the first target is predicted from the
    # separator (position s_B) or, without one, from the last prompt token (s_B - 1).
    gather_BxL = jnp.clip(s_B[:, None] - 1 + sep + jnp.arange(length)[None, :], 0, total - 1)
    return tokens, valid.astype(jnp.int32), gather_BxL

  def target_logits(self, params, batch, *, return_hidden=False, deterministic=True, rngs=None):
    if "targets_segment_ids" in batch or "inputs_segment_ids" in batch:
      raise ValueError(
        "packed batches are not supported by decoder-only (prefix-LM) models; set packing=False "
        "in the data config, or use an encoder-decoder model."
      )
    tokens, seg, gather = self._layout(batch["inputs"], batch["targets"])
    cls = type(self.module)
    if hasattr(cls, "logits_from_hidden"):  # project only the target positions onto the vocab
      h = self.module.apply(
        {"params": params}, tokens, segment_ids_BxL=seg, deterministic=deterministic, rngs=rngs,
        method=cls.hidden_states,
      )
      h = jnp.take_along_axis(h, gather[:, :, None], axis=1)
      logits = self.module.apply({"params": params}, h, method=cls.logits_from_hidden)
      return logits, (h if return_hidden else None)
    out = self.module.apply(
      {"params": params}, tokens, segment_ids_BxL=seg, deterministic=deterministic,
      return_hidden=return_hidden, rngs=rngs,
    )
    logits, hidden = out if return_hidden else (out, None)
    logits = jnp.take_along_axis(logits, gather[:, :, None], axis=1)
    if hidden is not None:
      hidden = jnp.take_along_axis(hidden, gather[:, :, None], axis=1)
    return logits, hidden

  def decode_state(self, params, inputs_BxS, max_len: int):
    b, s = inputs_BxS.shape
    sep = self._sep
    need = s + sep + max_len
    _check_len(need, self.max_len, f"decoding (inputs {s} + {sep} + max_len {max_len})")
    small = self.with_capacity(need) if need < self.max_len else self
    if small.max_len < self.max_len:  # a cache of the slots this request needs, not the context
      return small.decode_state(params, inputs_BxS, max_len)
    module = self.module

    def step(tokens_B, cache):
      logits, mut = module.apply(
        {"params": params, "cache": cache}, tokens_B[:, None], decode=True, mutable=["cache"]
      )
      return logits[:, 0], mut["cache"]

    cache = self._empty_cache(lambda r, t: module.init(r, t, decode=True), b)
    # Prefill the (left-aligned) prompt one token at a time; rows whose prompt has ended keep
    # their cache unchanged, so prompts of different lengths share one batch. Without a
    # separator the last prompt token is not prefilled: it is the first token decoding feeds.
    s_B = _lengths(inputs_BxS)
    n_B = s_B if sep else jnp.maximum(s_B - 1, 0)

    def prefill(cache, i):
      _, new = step(inputs_BxS[:, i], cache)
      keep = i < n_B
      return jax.tree.map(
        lambda n, o: jnp.where(keep.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, cache
      ), None

    if self.parallel_prefill and getattr(module, "parallel_prefill", False) and s > 0:
      valid = jnp.arange(s)[None, :] < n_B[:, None]
      _, mut = module.apply(
        {"params": params, "cache": cache}, inputs_BxS, valid, method=type(module).prefill,
        mutable=["cache"],
      )
      cache = _set_cache_position(mut["cache"], n_B)
    else:
      cache, _ = jax.lax.scan(prefill, cache, jnp.arange(s))
    if sep:
      first_B = jnp.full((b,), self.separator_id, jnp.int32)
    else:
      first_B = jnp.take_along_axis(inputs_BxS, n_B[:, None], axis=1)[:, 0]
    return step, first_B, cache



@dataclasses.dataclass(frozen=True)
class EncoderDecoder(SeqModel):
  """T5-style encoder-decoder adapter."""

  decoder_start_id: int = BOS_ID

  def init_fn(self, batch_size: int = 1, input_len: int = 8, target_len: int = 8):
    inputs = jnp.ones((batch_size, input_len), jnp.int32)
    targets = jnp.ones((batch_size, target_len), jnp.int32)
    return lambda rng: self.module.init(rng, inputs, targets)

  def _decoder_inputs(self, batch):
    targets = batch["targets"]
    shifted = jnp.concatenate(
      [jnp.full_like(targets[:, :1], self.decoder_start_id), targets[:, :-1]], axis=1
    )
    seg = batch.get("targets_segment_ids")
    if seg is not None:  # packed: each segment starts with the decoder start token
      starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
      shifted = jnp.where(starts, self.decoder_start_id, shifted)
    return shifted

  def target_logits(self, params, batch, *, return_hidden=False, deterministic=True, rngs=None):
    inputs, targets = batch["inputs"], batch["targets"]
    _check_len(inputs.shape[1], self.max_len, "the encoder input")
    _check_len(targets.shape[1], self.max_len, "the target")
    out = self.module.apply(
      {"params": params}, inputs, self._decoder_inputs(batch),
      inputs_segment_ids=batch.get("inputs_segment_ids"),
      inputs_positions=batch.get("inputs_positions"),
      decoder_segment_ids=batch.get("targets_segment_ids"),
      decoder_positions=batch.get("targets_positions"),
      deterministic=deterministic, return_hidden=return_hidden, rngs=rngs,
    )
    return out if return_hidden else (out, None)

  def candidate_logits(
    self, params, inputs_BxS, candidates_BxKxL, *, return_hidden=False, deterministic=True,
    rngs=None,
  ):
    """Runs the encoder once per input, then the decoder on all ``B*K`` candidates."""
    b, k, length = candidates_BxKxL.shape
    seg = (inputs_BxS != PAD_ID).astype(jnp.int32)
    encoded = self.module.apply(
      {"params": params}, inputs_BxS, seg, deterministic=deterministic,
      method=self.module.encode, rngs=rngs,
    )
    targets = candidates_BxKxL.reshape(b * k, length)
    out = self.module.apply(
      {"params": params}, jnp.repeat(encoded, k, axis=0), jnp.repeat(seg, k, axis=0),
      self._decoder_inputs({"targets": targets}), deterministic=deterministic,
      return_hidden=return_hidden, method=self.module.decode, rngs=rngs,
    )
    logits, hidden = out if return_hidden else (out, None)
    logits = logits.reshape(b, k, length, -1)
    if hidden is not None:
      hidden = hidden.reshape(b, k, length, -1)
    return logits, hidden

  def decode_state(self, params, inputs_BxS, max_len: int):
    b, s = inputs_BxS.shape
    _check_len(max_len, self.max_len, "decoding max_len")
    need = max(max_len, s)  # the decoder cache's slots; the encoder reads s positions
    small = self.with_capacity(need) if need < self.max_len else self
    if small.max_len < self.max_len:  # a cache of the slots this request needs, not the context
      return small.decode_state(params, inputs_BxS, max_len)
    module = self.module
    seg = (inputs_BxS != PAD_ID).astype(jnp.int32)
    encoded = module.apply({"params": params}, inputs_BxS, seg, method=module.encode)

    def step(tokens_B, cache):
      logits, mut = module.apply(
        {"params": params, "cache": cache["decoder"]}, cache["encoded"], cache["encoder_seg"],
        tokens_B[:, None], decode=True, mutable=["cache"], method=module.decode,
      )
      return logits[:, 0], {**cache, "decoder": mut["cache"]}

    def init_call(rng, tokens):
      return module.init(
        rng, encoded[:1].repeat(tokens.shape[0], 0), seg[:1].repeat(tokens.shape[0], 0), tokens,
        decode=True, method=module.decode,
      )

    cache = {
      "decoder": self._empty_cache(init_call, b),
      "encoded": encoded,
      "encoder_seg": seg,
    }
    return step, jnp.full((b,), self.decoder_start_id, jnp.int32), cache
