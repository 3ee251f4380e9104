"""Result and loop-state dataclasses shared by every autoregressive decoding algorithm.

All algorithms drive one step function::

  tokens_to_logits(tokens_B: int32[B], cache: PyTree) -> (logits_BxV: float32[B, V], new_cache)

The step consumes the previous token and returns the logits of the next one; the cache holds
everything else (KV cache or recurrent state, per-row position). Every cache leaf has a leading
batch dimension. K candidates per input are made by ``jnp.repeat(leaf, K, axis=0)``, so the rows
``b*K .. b*K+K-1`` belong to input ``b``; in tensor names that flattened ``B*K`` axis is written
``BK`` (``tokens_BKxL`` has shape ``[B*K, L]``).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]

NEG_INF = float("-inf")


@flax.struct.dataclass
class DecodeResult:
  """What every decoding algorithm returns.

  Attributes:
    tokens_BxKxL: int32 ``[B, K, L]`` with ``L = max_len``: the generated tokens of K candidates
      per input, NOT including the init token, ``pad_id`` after EOS (``pad_id`` itself is never
      generated, so the non-pad tokens are exactly the candidate).
    logp_BxK: float32 ``[B, K]``: the raw model log-probability of the generated tokens up to and
      including EOS (sum of ``log_softmax(logits)`` at the chosen tokens; no temperature, no
      length penalty). ``-inf`` marks an empty beam slot.
    scores_BxK: float32 ``[B, K]``: the ranking score. Beam search: the length-penalized
      ``logp / ((5 + length) / 6) ** alpha``; greedy and sampling: equal to ``logp_BxK``.
    lengths_BxK: int32 ``[B, K]``: generated tokens up to and including EOS, or ``max_len`` when
      no EOS was produced (0 for an empty beam slot).
    stats: optional algorithm statistics; :class:`SpeculativeStats` for speculative decoding,
      ``None`` otherwise.
  """

  tokens_BxKxL: jax.Array
  logp_BxK: jax.Array
  scores_BxK: jax.Array
  lengths_BxK: jax.Array
  stats: Any = None


@flax.struct.dataclass
class SpeculativeStats:
  """Statistics of speculative decoding (``slicjax.decoding.speculative``).

  A round is one target evaluation: the draft proposes ``gamma`` tokens per running row and the
  target scores them in one pass. Rows that have finished take no part in later rounds.

  Attributes:
    accepted_BxK: int32 ``[B, K]``: draft tokens the target accepted, per row.
    proposed_BxK: int32 ``[B, K]``: draft tokens proposed (``gamma`` per round the row ran).
    target_calls_BxK: int32 ``[B, K]``: rounds the row ran (target evaluations it needed).
    num_rounds: int32 ``[]``: rounds of the whole batch (target forward passes).
    acceptance_rate: float32 ``[]``: accepted / proposed over all rows.
    tokens_per_target_call: float32 ``[]``: emitted tokens / row-rounds over all rows (1 would
      be plain decoding; at most ``gamma + 1``).
  """

  accepted_BxK: jax.Array
  proposed_BxK: jax.Array
  target_calls_BxK: jax.Array
  num_rounds: jax.Array
  acceptance_rate: jax.Array
  tokens_per_target_call: jax.Array


@flax.struct.dataclass
class SamplingState:
  """Loop state of greedy search and sampling (``BK = B * K`` rows, one per candidate).

  Attributes:
    step: int32 ``[]``: tokens generated so far (the next token is written at this position).
    last_tokens_BK: int32 ``[B*K]``: the token fed to the next step call.
    tokens_BKxL: int32 ``[B*K, L]``: generated tokens, ``pad_id`` at and after ``step`` and after
      EOS.
    logp_BK: float32 ``[B*K]``: running raw model log-probability of each row.
    finished_BK: bool ``[B*K]``: the row has produced EOS.
    lengths_BK: int32 ``[B*K]``: length including EOS for finished rows (0 while running).
    keys_BK: ``[B*K]`` PRNG keys (``[B*K, 2]`` uint32 for raw keys), one per row; ``None`` for
      greedy search.
    cache: the step function's cache; every leaf has leading dimension ``B*K``.
  """

  step: jax.Array
  last_tokens_BK: jax.Array
  tokens_BKxL: jax.Array
  logp_BK: jax.Array
  finished_BK: jax.Array
  lengths_BK: jax.Array
  keys_BK: Any
  cache: Any


@flax.struct.dataclass
class BeamState:
  """Loop state of (diverse) beam search: G groups of ``K / G`` beams, group-major slots.

  Slot ``g * (K // G) + j`` holds beam ``j`` of group ``g``; plain beam search is ``G = 1``.

  Attributes:
    step: int32 ``[]``: tokens generated so far by the alive beams.
    last_tokens_BK: int32 ``[B*K]``: the last token of each alive beam (the next step's input).
    alive_tokens_BxKxL: int32 ``[B, K, L]``: alive (unfinished) hypotheses, ``pad_id`` from
      ``step`` on.
    alive_logp_BxK: float32 ``[B, K]``: raw log-probability of each alive hypothesis (``-inf``
      for an empty slot).
    finished_tokens_BxKxL: int32 ``[B, K, L]``: the best finished hypotheses found so far, per
      group, ending in EOS (or reaching ``max_len``), ``pad_id`` after.
    finished_logp_BxK: float32 ``[B, K]``: raw log-probability of each finished hypothesis.
    finished_scores_BxK: float32 ``[B, K]``: length-penalized score (``-inf`` = empty slot).
    finished_lengths_BxK: int32 ``[B, K]``: length of each finished hypothesis.
    done_BxG: bool ``[B, G]``: the group holds ``K / G`` finished hypotheses that no alive beam
      can still beat; its finished set is final.
    cache: the step function's cache; every leaf has leading dimension ``B*K``.
  """

  step: jax.Array
  last_tokens_BK: jax.Array
  alive_tokens_BxKxL: jax.Array
  alive_logp_BxK: jax.Array
  finished_tokens_BxKxL: jax.Array
  finished_logp_BxK: jax.Array
  finished_scores_BxK: jax.Array
  finished_lengths_BxK: jax.Array
  done_BxG: jax.Array
  cache: Any


def check_decode_args(
  init_tokens_B,
  cache,
  *,
  max_len: int,
  min_len: int,
  eos_id: int,
  pad_id: int,
  no_repeat_ngram_size: int,
) -> int:
  """Validates the arguments every algorithm shares; returns the batch size B."""
  init_tokens_B = jnp.asarray(init_tokens_B)
  if init_tokens_B.ndim != 1:
    raise ValueError(
      f"init_tokens_B must be 1-D [B] (one start token per input), got shape "
      f"{init_tokens_B.shape}; pass e.g. jnp.full((B,), bos_id)."
    )
  if not jnp.issubdtype(init_tokens_B.dtype, jnp.integer):
    raise ValueError(f"init_tokens_B must hold integer token ids, got dtype {init_tokens_B.dtype}.")
  b = init_tokens_B.shape[0]
  for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
    shape = getattr(leaf, "shape", ())
    if len(shape) == 0 or shape[0] != b:
      raise ValueError(
        f"cache leaf {jax.tree_util.keystr(path)} has shape {tuple(shape)}, but every cache leaf "
        f"must have the batch size {b} as its leading dimension; give scalars (e.g. a position "
        f"counter) a [B] batch axis."
      )
  for name, v in (
    ("max_len", max_len),
    ("min_len", min_len),
    ("eos_id", eos_id),
    ("pad_id", pad_id),
    ("no_repeat_ngram_size", no_repeat_ngram_size),
  ):
    if not isinstance(v, int) or isinstance(v, bool):
      raise ValueError(f"{name} must be a Python int, got {v!r}.")
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1 (tokens to generate), got {max_len}.")
  if not 0 <= min_len <= max_len:
    raise ValueError(
      f"min_len must be in [0, max_len={max_len}], got {min_len}; lower min_len or raise max_len."
    )
  if no_repeat_ngram_size < 0:
    raise ValueError(
      f"no_repeat_ngram_size must be >= 0 (0 turns blocking off), got {no_repeat_ngram_size}."
    )
  if eos_id == pad_id:
    raise ValueError(f"eos_id and pad_id must differ (both are {eos_id}).")
  return b
