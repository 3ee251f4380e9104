"""The masked-diffusion family behind the :class:`~slicjax.models.seq_model.SeqModel` interface.

A diffusion LM has no next-token logits, so the adapter offers the two things the rest of the
library needs in their diffusion form:

* ``sequence_logprob(params, inputs, targets, rng)``: the ELBO estimate of log p(targets | inputs)
  (``scoring.score_targets`` / ``score_candidates`` call it, so calibration and preference losses
  run unchanged); the same ``rng`` gives the same timesteps and masks, so a policy and a reference
  scored with one key share them (low-variance differences, VRPO-style);
* ``generate(params, inputs, method=..., ...)``: parallel sampling (``decoding.decode`` calls it).

The layout is the prefix one of :func:`slicjax.models.diffusion.prefix_layout`:
``inputs + [BOS] + L target slots`` with the prompt never masked; all L slots are scored and
generated, so the model learns where EOS and padding go.

``block_length > 0`` makes the model block-causal (blocks of the canvas decoded left to right,
committed blocks' keys/values cached: :func:`~slicjax.decoding.diffusion_sampling.
cached_block_sample`); ``shift`` / ``causal_prompt`` make it loadable from an autoregressive
checkpoint (:func:`~slicjax.models.diffusion.params_from_autoregressive`). ``sampler`` picks the
commit rule of ``generate`` (``threshold`` τ = ``sampler_threshold``, ``factor`` f =
``sampler_factor``, ``topk``: one token per step); ``eos_fill`` keeps outputs from filling the
padding first (PAD is never committed directly, slots after the first EOS become PAD).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from slicjax.decoding import diffusion_sampling
from slicjax.decoding.types import DecodeResult
from slicjax.models import diffusion
from slicjax.models.seq_model import EOS_ID, PAD_ID, SeqModel
from slicjax.models.transformer import TransformerConfig, TransformerLM

ADAPTER_KEYS = ("schedule", "num_elbo_samples", "sampler_threshold", "sampler", "sampler_factor",
                "block_length", "shift", "causal_prompt", "eos_fill")
SAMPLERS = ("threshold", "factor", "topk")


@dataclasses.dataclass(frozen=True)
class DiffusionSeq2Seq(SeqModel):
  """Seq2seq adapter over :class:`~slicjax.models.diffusion.DiffusionLM`.

  Attributes:
    lm: the diffusion LM (bidirectional backbone + masking process).
    num_elbo_samples: Monte Carlo samples (antithetic timesteps) per ELBO estimate.
    sampler_threshold: τ of the confidence-threshold sampler used by ``generate``.
    sampler: commit rule of ``generate``: ``threshold``, ``factor`` or ``topk`` (one token per
      evaluation).
    sampler_factor: f of the ``factor`` rule.
    eos_fill: PAD never committed directly; slots after the first EOS become PAD.
  """

  lm: Any = None
  num_elbo_samples: int = 4
  sampler_threshold: float = 0.9
  sampler: str = "threshold"
  sampler_factor: float = 1.0
  eos_fill: bool = True

  def init_fn(self, batch_size: int = 1, input_len: int = 8, target_len: int = 8):
    tokens = jnp.zeros((batch_size, input_len + 1 + target_len), jnp.int32)
    return lambda rng: self.module.init(rng, tokens)

  def _layout(self, inputs_BxS, targets_BxL):
    total = inputs_BxS.shape[1] + 1 + targets_BxL.shape[1]
    if total > self.max_len:
      raise ValueError(
        f"a diffusion sequence (inputs + 1 + targets = {total}) exceeds the model's max_len "
        f"{self.max_len}; shorten the data or raise max_len."
      )
    return diffusion.prefix_layout(inputs_BxS, targets_BxL, score_padding=True)

  def target_logits(self, params, batch, **kw):
    raise ValueError(
      "diffusion models have no teacher-forced next-token logits: scoring uses the ELBO "
      "(sequence_logprob). Use regularizer='ce' or 'none' (not 'kl'), and a 'rouge' or "
      "'token_embedding' similarity (not 'latent')."
    )

  candidate_logits = target_logits

  def sequence_logprob(self, params, inputs_BxS, targets_BxL, rng):
    """ELBO estimate of ``log p(targets | inputs)``: ``[B]`` (a lower bound in expectation)."""
    tokens, tmask = self._layout(inputs_BxS, targets_BxL)
    return self.lm.logprob(params, tokens, tmask, rng, num_samples=self.num_elbo_samples,
                           canvas_len=targets_BxL.shape[1])

  def mle_loss(self, params, batch, rng, *, deterministic=False, anneal_p=None):
    """One-sample −ELBO per example, ``[B]`` (the diffusion counterpart of token cross-entropy).

    ``anneal_p``: attention-mask annealing probability (AR adaptation, see
    :func:`slicjax.models.diffusion.anneal_mask`)."""
    tokens, tmask = self._layout(batch["inputs"], batch["targets"])
    k_loss, k_drop = jax.random.split(rng)
    return self.lm.loss(params, tokens, tmask, k_loss, deterministic=deterministic,
                        dropout_rng=None if deterministic else k_drop,
                        canvas_len=batch["targets"].shape[1], anneal_p=anneal_p)

  def decode_state(self, params, inputs_BxS, max_len):
    raise ValueError("diffusion models do not decode token by token; use decoding.decode with "
                     "method='sample' or 'greedy' (parallel sampling).")

  def sample(self, params, inputs_BxS, rng, *, max_len: int, temperature: float = 0.0,
             sampler: str | None = None, **overrides):
    """The ``max_len`` generated slots per input ``[B, max_len]`` and the sampler statistics:
    :func:`~slicjax.decoding.diffusion_sampling.cached_block_sample` for a block-causal model,
    otherwise the whole-sequence confidence loop. ``overrides``: ``threshold``, ``factor``,
    ``steps_per_block``, ``eos_fill``."""
    sampler = self.sampler if sampler is None else sampler
    if sampler not in SAMPLERS:
      raise ValueError(f"unknown diffusion sampler {sampler!r}; choose from {SAMPLERS}.")
    kw = {**dict(threshold=self.sampler_threshold, factor=self.sampler_factor,
                 eos_fill=self.eos_fill), **overrides, "temperature": temperature}
    mask_id = self.lm.mask_id
    if self.lm.block_length is not None:
      return diffusion_sampling.cached_block_sample(
        self.lm, params, inputs_BxS, rng, target_len=max_len, rule=sampler, **kw
      )
    tokens, tmask = diffusion.prefix_layout(inputs_BxS, target_len=max_len, mask_id=mask_id)
    fixed = tmask == 0
    args = (self.lm.denoiser(params), tokens, fixed, rng)
    if sampler == "threshold":
      kw.pop("factor")
      out, stats = diffusion_sampling.confidence_threshold_sample(*args, mask_id=mask_id, **kw)
    elif sampler == "factor":
      kw.pop("threshold")
      out, stats = diffusion_sampling.confidence_factor_sample(*args, mask_id=mask_id, **kw)
    else:
      kw.pop("threshold"), kw.pop("factor")
      out, stats = diffusion_sampling.low_confidence_remasking_sample(
        *args, mask_id=mask_id, **kw
      )
    s_B = jnp.sum(inputs_BxS != PAD_ID, axis=-1)
    idx = s_B[:, None] + 1 + jnp.arange(max_len)[None, :]
    return jnp.take_along_axis(out, idx, axis=1), stats

  def generate(self, params, inputs_BxS, *, method: str, max_len: int, rng=None,
               example_ids=None, num_samples: int = 1, temperature: float = 0.0,
               **unused) -> DecodeResult:
    """K candidates per input by parallel sampling with the ``sampler`` rule (Fast-dLLM):
    cached block decoding for a block-causal model, else the whole-canvas loop."""
    if method not in ("sample", "greedy"):
      raise ValueError(f"diffusion models support method='sample' or 'greedy', not {method!r} "
                       "(beam search needs left-to-right scores).")
    k = num_samples if method == "sample" else 1
    temperature = temperature if method == "sample" else 0.0
    rng = jax.random.PRNGKey(0) if rng is None else rng
    b = inputs_BxS.shape[0]
    inputs = jnp.repeat(inputs_BxS, k, axis=0)
    gen, _ = self.sample(params, inputs, rng, max_len=max_len, temperature=temperature)
    # Everything after the first EOS is padding, like the autoregressive decoders return.
    after_eos = jnp.cumsum(jnp.cumsum((gen == EOS_ID).astype(jnp.int32), 1), 1) > 1
    gen = jnp.where(after_eos, PAD_ID, gen)
    logp = self.sequence_logprob(params, inputs, gen, rng)
    lengths = jnp.sum(gen != PAD_ID, axis=-1)
    return DecodeResult(
      tokens_BxKxL=gen.reshape(b, k, max_len), logp_BxK=logp.reshape(b, k),
      scores_BxK=logp.reshape(b, k), lengths_BxK=lengths.reshape(b, k),
    )


def build(d: dict[str, Any]) -> DiffusionSeq2Seq:
  """``family='diffusion'`` config: transformer fields + ``schedule``, ``num_elbo_samples``,
  ``sampler_threshold``, ``sampler``, ``sampler_factor``, ``block_length`` (0 = bidirectional
  canvas), ``shift``, ``causal_prompt``, ``eos_fill``. ``vocab_size`` is the tokenizer's; one
  more id is added for [MASK]."""
  d = dict(d)
  extra = {k: d.pop(k) for k in ADAPTER_KEYS if k in d}
  vocab = int(d.get("vocab_size", TransformerConfig.vocab_size))
  d["vocab_size"] = vocab + 1
  d["causal"] = False
  cfg = TransformerConfig.from_dict(d)
  backbone = TransformerLM(cfg)
  block_length = int(extra.get("block_length", 0))
  if block_length < 0:
    raise ValueError(f"model.block_length must be >= 0 (0 = one bidirectional canvas), got "
                     f"{block_length}.")
  sampler = str(extra.get("sampler", "threshold"))
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown model.sampler {sampler!r}; choose from {SAMPLERS}.")
  lm = diffusion.DiffusionLM(
    backbone, cfg.vocab_size, mask_id=vocab, schedule=extra.get("schedule", "linear"),
    block_length=block_length or None, shift=bool(extra.get("shift", False)),
    causal_prompt=bool(extra.get("causal_prompt", False)),
  )
  return DiffusionSeq2Seq(
    backbone, cfg.max_len, vocab, "diffusion", lm=lm,
    num_elbo_samples=int(extra.get("num_elbo_samples", 4)),
    sampler_threshold=float(extra.get("sampler_threshold", 0.9)),
    sampler=sampler, sampler_factor=float(extra.get("sampler_factor", 1.0)),
    eos_fill=bool(extra.get("eos_fill", True)),
  )
