"""Reward models for preference optimization: a pointwise Bradley–Terry model and a pairwise
text-to-text ranking model, both on top of any :class:`~slicjax.models.seq_model.SeqModel`.

* :class:`RewardModel` — a scalar head (``Dense(1)``, its own ``head`` parameter subtree) on the
  backbone's final decoder state. The state used is the one that *predicts the last real target
  token* (the EOS): in the prefix-LM layout ``inputs + [BOS] + targets`` and in an
  encoder-decoder alike it has read the whole prompt and every content token of the completion.
  Parameters are ``{"backbone": <SeqModel params>, "head": {"kernel", "bias"}}``, so a fine-tuned
  policy's parameters initialize the backbone unchanged. Trained with
  :func:`bradley_terry_loss`.
* :class:`PairwiseRanker` — a text-to-text model that reads
  ``[CONTEXT] x [SUMMARY A] a [SUMMARY B] b`` and writes ``A`` or ``B`` (then EOS). The
  separators and the two label tokens are a :class:`PairFormat`: pieces of a tokenizer
  (:meth:`PairFormat.from_tokenizer`) or five reserved ids just past the task vocabulary
  (:meth:`PairFormat.reserved`, for token-id tasks without a tokenizer). Trained with random
  order flips (:func:`flip_order`); ``P("A")`` is read from the logits of the first target
  position restricted to the two label tokens, and a pointwise reward comes from a baseline
  completion: ``r(x, y) = logit ρ(x, y, y_b)``.

References: Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", 2023
(arXiv 2305.10425); Liu et al., "Statistical Rejection Sampling Improves Preference
Optimization", ICLR 2024 (arXiv 2309.06657).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from slicjax import scoring
from slicjax.models.seq_model import EOS_ID, PAD_ID, SeqModel


def bradley_terry_loss(reward_chosen_B: jax.Array, reward_rejected_B: jax.Array) -> jax.Array:
  """Negative log-likelihood of the preferences under the Bradley–Terry model.

  .. math::

    \\mathcal{L} = -\\log\\sigma\\bigl(r(x, y_w) - r(x, y_l)\\bigr)

  Args:
    reward_chosen_B: ``r(x, y_w)`` for each pair.
    reward_rejected_B: ``r(x, y_l)``, same shape.

  Returns:
    ``[B]`` loss (unreduced).

  References: Bradley & Terry, "Rank Analysis of Incomplete Block Designs", Biometrika 1952;
  Ouyang et al., "Training language models to follow instructions with human feedback", 2022.
  """
  rw, rl = jnp.asarray(reward_chosen_B), jnp.asarray(reward_rejected_B)
  if rw.shape != rl.shape:
    raise ValueError(
      f"bradley_terry_loss: chosen rewards {rw.shape} and rejected rewards {rl.shape} must have "
      "the same shape (one value per pair)."
    )
  return -jax.nn.log_sigmoid(rw.astype(jnp.float32) - rl.astype(jnp.float32))


def _last_state(hidden_BxLxD: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """The decoder state predicting each row's last real target token: ``[B, D]``."""
  last_B = jnp.maximum(jnp.sum((targets_BxL != PAD_ID).astype(jnp.int32), axis=-1) - 1, 0)
  return jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], axis=1)[:, 0]


class RewardHead(nn.Module):
  """``Dense(1)`` from the model dimension to a scalar reward."""

  @nn.compact
  def __call__(self, h_BxD):
    out = nn.Dense(
      1,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.normal(stddev=h_BxD.shape[-1] ** -0.5), ("embed", "classes")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
      name="dense",
    )(h_BxD.astype(jnp.float32))
    return out[:, 0]


def _no_packing(batch):
  if "targets_segment_ids" in batch or "inputs_segment_ids" in batch:
    raise ValueError(
      "reward models score one completion per row; packed batches are not supported (set "
      "packing=False)."
    )


@dataclasses.dataclass(frozen=True)
class RewardModel:
  """Pointwise Bradley–Terry reward model: ``r(x, y) = w · h_last(x, y) + b``.

  Attributes:
    backbone: the sequence model (any family) whose final decoder state is read.
  """

  backbone: SeqModel

  def init_fn(self, batch_size: int = 1, input_len: int = 8, target_len: int = 8):
    """``rng -> {"params": {"backbone", "head"}}`` (boxed, for sharded init)."""
    backbone_init = self.backbone.init_fn(batch_size, input_len, target_len)
    backbone = self.backbone

    def init(rng):
      r_backbone, r_head = jax.random.split(rng)
      bb = backbone_init(r_backbone)["params"]
      dummy = {
        "inputs": jnp.ones((1, input_len), jnp.int32),
        "targets": jnp.ones((1, target_len), jnp.int32),
      }
      _, hidden = jax.eval_shape(
        lambda p: backbone.target_logits(p, dummy, return_hidden=True), nn.unbox(bb)
      )
      head = RewardHead().init(r_head, jnp.zeros((1, hidden.shape[-1]), jnp.float32))["params"]
      return {"params": {"backbone": bb, "head": head}}

    return init

  def init(self, rng, **kw):
    """Unboxed parameters (the init runs as one compiled program)."""
    return nn.unbox(jax.jit(self.init_fn(**kw))(rng))["params"]

  def params_from_backbone(self, backbone_params, rng, *, input_len=8, target_len=8):
    """Reward-model params whose backbone is ``backbone_params`` (e.g. the SFT policy's) and
    whose head is freshly initialized (only the head is initialized)."""
    dummy = {
      "inputs": jnp.ones((1, input_len), jnp.int32),
      "targets": jnp.ones((1, target_len), jnp.int32),
    }
    _, hidden = jax.eval_shape(
      lambda p: self.backbone.target_logits(p, dummy, return_hidden=True), backbone_params
    )
    head = RewardHead().init(rng, jnp.zeros((1, hidden.shape[-1]), jnp.float32))["params"]
    return {"backbone": backbone_params, "head": nn.unbox(head)}

  def rewards(self, params, batch, *, deterministic=True, rngs=None) -> jax.Array:
    """``r(x, y)`` for ``batch = {"inputs": [B, S], "targets": [B, L]}``: ``[B]`` float32."""
    _no_packing(batch)
    _, hidden = self.backbone.target_logits(
      params["backbone"], batch, return_hidden=True, deterministic=deterministic, rngs=rngs
    )
    return RewardHead().apply({"params": params["head"]}, _last_state(hidden, batch["targets"]))

  def candidate_rewards(self, params, inputs_BxS, candidates_BxKxL) -> jax.Array:
    """``r(x, y_k)`` of K completions per prompt: ``[B, K]``."""
    b, k, length = candidates_BxKxL.shape
    batch = {
      "inputs": jnp.repeat(inputs_BxS, k, axis=0),
      "targets": candidates_BxKxL.reshape(b * k, length),
    }
    return self.rewards(params, batch).reshape(b, k)

  def pair_loss(self, params, batch, rng=None, *, deterministic=True):
    """Bradley–Terry loss of ``batch = {"inputs", "chosen", "rejected"}``.

    Returns:
      ``(loss_B, metrics)`` with ``metrics = {"accuracy": [B], "margin": [B]}``.
    """
    b = batch["inputs"].shape[0]
    both = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
    rngs = None if rng is None else {"dropout": rng}
    r = self.rewards(
      params,
      {"inputs": jnp.concatenate([batch["inputs"]] * 2, axis=0), "targets": both},
      deterministic=deterministic,
      rngs=rngs,
    )
    rw, rl = r[:b], r[b:]
    return bradley_terry_loss(rw, rl), {
      "accuracy": (rw > rl).astype(jnp.float32),
      "margin": rw - rl,
    }


@dataclasses.dataclass(frozen=True)
class PairFormat:
  """Token ids that frame a ranker input and its label.

  Attributes:
    context_ids: the ``[CONTEXT]`` separator (one or more ids).
    summary_a_ids: the ``[SUMMARY A]`` separator.
    summary_b_ids: the ``[SUMMARY B]`` separator.
    label_a: the single id the ranker writes when the first completion is better.
    label_b: the id for the second completion.
  """

  context_ids: tuple[int, ...]
  summary_a_ids: tuple[int, ...]
  summary_b_ids: tuple[int, ...]
  label_a: int
  label_b: int

  NUM_RESERVED = 5

  def __post_init__(self):
    if self.label_a == self.label_b:
      raise ValueError(f"the two label ids must differ, got {self.label_a} for both.")
    ids = self.context_ids + self.summary_a_ids + self.summary_b_ids + (self.label_a, self.label_b)
    if not self.context_ids or not self.summary_a_ids or not self.summary_b_ids:
      raise ValueError("every separator needs at least one token id.")
    if any(i in (PAD_ID, EOS_ID) for i in ids):
      raise ValueError(f"separator/label ids may not be pad ({PAD_ID}) or eos ({EOS_ID}): {ids}.")

  @classmethod
  def reserved(cls, vocab_size: int) -> PairFormat:
    """Five reserved ids ``vocab_size .. vocab_size + 4``: ``[CONTEXT]``, ``[SUMMARY A]``,
    ``[SUMMARY B]``, ``A``, ``B``. The ranker's model needs ``vocab_size + 5`` embeddings."""
    v = int(vocab_size)
    return cls((v,), (v + 1,), (v + 2,), v + 3, v + 4)

  @classmethod
  def from_tokenizer(cls, tokenizer) -> PairFormat:
    """Separators as the tokenizer's pieces of ``"[CONTEXT] "``, ``" [SUMMARY A] "`` and
    ``" [SUMMARY B] "``; each label is the last piece of ``encode("A")`` / ``encode("B")``."""
    enc = tokenizer.encode
    la, lb = enc("A"), enc("B")
    if not la or not lb:
      raise ValueError("the tokenizer encodes 'A' or 'B' to nothing; use PairFormat.reserved.")
    return cls(
      tuple(enc("[CONTEXT] ")),
      tuple(enc(" [SUMMARY A] ")),
      tuple(enc(" [SUMMARY B] ")),
      la[-1],
      lb[-1],
    )

  @property
  def min_vocab_size(self) -> int:
    """The smallest model vocabulary that embeds every id of this format."""
    return (
      max(self.context_ids + self.summary_a_ids + self.summary_b_ids + (self.label_a, self.label_b))
      + 1
    )

  def input_len(self, prompt_len: int, completion_len: int) -> int:
    """Padded ranker input length for prompts ``[B, prompt_len]`` and completions
    ``[B, completion_len]``: nothing is ever truncated."""
    seps = len(self.context_ids) + len(self.summary_a_ids) + len(self.summary_b_ids)
    return seps + prompt_len + 2 * completion_len

  def to_dict(self) -> dict[str, Any]:
    return {
      "context_ids": list(self.context_ids),
      "summary_a_ids": list(self.summary_a_ids),
      "summary_b_ids": list(self.summary_b_ids),
      "label_a": self.label_a,
      "label_b": self.label_b,
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> PairFormat:
    return cls(
      tuple(d["context_ids"]),
      tuple(d["summary_a_ids"]),
      tuple(d["summary_b_ids"]),
      int(d["label_a"]),
      int(d["label_b"]),
    )


def content_only(tokens_BxL: jax.Array) -> jax.Array:
  """Completion content: the first EOS and everything after it become padding."""
  after_eos = jnp.cumsum((tokens_BxL == EOS_ID).astype(jnp.int32), axis=-1) > 0
  return jnp.where(after_eos, PAD_ID, tokens_BxL)


def concat_segments(segments: list[jax.Array]) -> jax.Array:
  """Concatenates right-padded ``[B, L_i]`` segments row by row, dropping each one's padding.

  Returns:
    ``[B, Σ L_i]``: every row's real tokens back to back, right-padded with 0. Jit-compatible.
  """
  b = segments[0].shape[0]
  total = sum(s.shape[1] for s in segments)
  out = jnp.zeros((b, total), jnp.int32)
  rows_Bx1 = jnp.arange(b)[:, None]
  offset_B = jnp.zeros((b,), jnp.int32)
  for seg in segments:
    seg = seg.astype(jnp.int32)
    valid = seg != PAD_ID
    # Real tokens keep their order; padding inside a segment (none expected) is squeezed out.
    rank = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
    pos = jnp.where(valid, offset_B[:, None] + rank, total)
    out = out.at[rows_Bx1, pos].set(seg, mode="drop")
    offset_B = offset_B + jnp.sum(valid.astype(jnp.int32), axis=1)
  return out


def flip_order(rng, chosen_BxL: jax.Array, rejected_BxL: jax.Array):
  """Random order flips for ranker training: each pair is shown as (chosen, rejected) or
  (rejected, chosen) with probability 1/2.

  Returns:
    ``(a_BxL, b_BxL, a_is_chosen_B)``; the label is ``A`` where ``a_is_chosen_B``.
  """
  a_is_chosen = jax.random.bernoulli(rng, 0.5, (chosen_BxL.shape[0],))
  a = jnp.where(a_is_chosen[:, None], chosen_BxL, rejected_BxL)
  b = jnp.where(a_is_chosen[:, None], rejected_BxL, chosen_BxL)
  return a, b, a_is_chosen


@dataclasses.dataclass(frozen=True)
class PairwiseRanker:
  """Text-to-text pairwise ranking model ``ρ(x, a, b) = P("A" | [CONTEXT] x [SUMMARY A] a
  [SUMMARY B] b)``.

  Attributes:
    model: the sequence model (any family, vocabulary ``>= fmt.min_vocab_size``).
    fmt: separator and label ids.
  """

  model: SeqModel
  fmt: PairFormat

  def __post_init__(self):
    if self.model.vocab_size < self.fmt.min_vocab_size:
      raise ValueError(
        f"the ranker's model has vocab_size {self.model.vocab_size} but its pair format uses ids "
        f"up to {self.fmt.min_vocab_size - 1}; set the reward model's vocab_size >= "
        f"{self.fmt.min_vocab_size}."
      )

  def init_fn(self, batch_size: int = 1, input_len: int = 8, target_len: int = 2):
    del target_len  # the ranker's target is always [label, EOS]
    return self.model.init_fn(batch_size, input_len, 2)

  def init(self, rng, **kw):
    """Unboxed parameters (the init runs as one compiled program)."""
    return nn.unbox(jax.jit(self.init_fn(**kw))(rng))["params"]

  def build_inputs(self, prompt_BxS, a_BxL, b_BxL) -> jax.Array:
    """``[CONTEXT] x [SUMMARY A] a [SUMMARY B] b`` per row (EOS dropped from ``a`` and ``b``)."""
    b = prompt_BxS.shape[0]

    def const(ids):
      return jnp.broadcast_to(jnp.asarray(ids, jnp.int32)[None, :], (b, len(ids)))

    f = self.fmt
    return concat_segments(
      [
        const(f.context_ids),
        prompt_BxS,
        const(f.summary_a_ids),
        content_only(a_BxL),
        const(f.summary_b_ids),
        content_only(b_BxL),
      ]
    )

  def targets(self, a_is_better_B) -> jax.Array:
    """``[label, EOS]`` targets ``[B, 2]``."""
    label = jnp.where(a_is_better_B, self.fmt.label_a, self.fmt.label_b).astype(jnp.int32)
    return jnp.stack([label, jnp.full_like(label, EOS_ID)], axis=1)

  def label_logits(self, params, prompt_BxS, a_BxL, b_BxL) -> jax.Array:
    """Logits of ``A`` and ``B`` at the first target position: ``[B, 2]``."""
    inputs = self.build_inputs(prompt_BxS, a_BxL, b_BxL)
    dummy = self.targets(jnp.ones((inputs.shape[0],), bool))
    logits, _ = self.model.target_logits(params, {"inputs": inputs, "targets": dummy})
    first = logits[:, 0]
    return jnp.stack([first[:, self.fmt.label_a], first[:, self.fmt.label_b]], axis=-1)

  def prob_a(self, params, prompt_BxS, a_BxL, b_BxL) -> jax.Array:
    """``ρ(x, a, b) = P("A")`` restricted to the two label tokens: ``[B]``."""
    ll = self.label_logits(params, prompt_BxS, a_BxL, b_BxL)
    return jax.nn.sigmoid(ll[:, 0] - ll[:, 1])

  def reward(self, params, prompt_BxS, y_BxL, baseline_BxL) -> jax.Array:
    """Pointwise reward ``r(x, y) = logit ρ(x, y, y_b)`` against a baseline completion: ``[B]``."""
    ll = self.label_logits(params, prompt_BxS, y_BxL, baseline_BxL)
    return ll[:, 0] - ll[:, 1]

  def candidate_rewards(self, params, prompt_BxS, candidates_BxKxL, baseline_BxL) -> jax.Array:
    """``logit ρ(x, y_k, y_b)`` for K completions per prompt: ``[B, K]``."""
    b, k, length = candidates_BxKxL.shape
    r = self.reward(
      params,
      jnp.repeat(prompt_BxS, k, axis=0),
      candidates_BxKxL.reshape(b * k, length),
      jnp.repeat(baseline_BxL, k, axis=0),
    )
    return r.reshape(b, k)

  def compare_fn(
    self, params, prompt_BxS, candidates_BxMxL, *, symmetric: bool = True
  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A ``compare(left_BxP, right_BxP) -> P(left beats right)`` judge over candidate indices
    (for :mod:`slicjax.preference.ranking`). ``symmetric`` averages both presentation orders,
    ``(ρ(x, l, r) + 1 − ρ(x, r, l)) / 2``, removing position bias."""
    b, _, length = candidates_BxMxL.shape

    def gather(idx_BxP):
      p = idx_BxP.shape[1]
      out = jnp.take_along_axis(candidates_BxMxL, jnp.maximum(idx_BxP, 0)[:, :, None], axis=1)
      return out.reshape(b * p, length)

    def compare(left_BxP, right_BxP):
      p = left_BxP.shape[1]
      x = jnp.repeat(prompt_BxS, p, axis=0)
      lt, rt = gather(left_BxP), gather(right_BxP)
      prob = self.prob_a(params, x, lt, rt)
      if symmetric:
        prob = 0.5 * (prob + 1.0 - self.prob_a(params, x, rt, lt))
      return prob.reshape(b, p)

    return compare

  def pair_loss(self, params, batch, rng, *, deterministic=True):
    """Text-to-text loss ``−log P(label, EOS | input)`` on randomly flipped pairs.

    Args:
      params: ranker params.
      batch: ``{"inputs": [B, S], "chosen": [B, L], "rejected": [B, L]}``.
      rng: PRNG key for the order flips (and dropout).

    Returns:
      ``(loss_B, metrics)``: ``accuracy`` (restricted ``P(correct label) > 0.5``) and
      ``a_is_chosen`` (the flips, ``[B]``).
    """
    k_flip, k_drop = jax.random.split(rng)
    a, b, a_is_chosen = flip_order(k_flip, batch["chosen"], batch["rejected"])
    inputs = self.build_inputs(batch["inputs"], a, b)
    scored = scoring.score_targets(
      self.model,
      params,
      {"inputs": inputs, "targets": self.targets(a_is_chosen)},
      deterministic=deterministic,
      rngs=None if deterministic else {"dropout": k_drop},
    )
    first = scored["logits"][:, 0]
    logit_a = first[:, self.fmt.label_a] - first[:, self.fmt.label_b]
    correct = jnp.where(a_is_chosen, logit_a > 0, logit_a < 0)
    return -scored["logp"], {
      "accuracy": correct.astype(jnp.float32),
      "a_is_chosen": a_is_chosen.astype(jnp.float32),
    }

  def pair_accuracy(self, params, prompt_BxS, chosen_BxL, rejected_BxL) -> jax.Array:
    """1.0 where the symmetrized ranker prefers the chosen completion: ``[B]``."""
    p = 0.5 * (
      self.prob_a(params, prompt_BxS, chosen_BxL, rejected_BxL)
      + 1.0
      - self.prob_a(params, prompt_BxS, rejected_BxL, chosen_BxL)
    )
    return (p > 0.5).astype(jnp.float32)
