"""Builds a :class:`~slicjax.models.seq_model.SeqModel` from a plain config dict.

``family`` picks the decoder family: ``transformer`` (decoder-only when ``num_encoder_layers``
is 0, else encoder-decoder), ``ssm`` (``models/ssm.py``) or ``diffusion``
(``models/diffusion.py``, a bidirectional transformer backbone). Every other key is a field of
that family's config dataclass; unknown keys raise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slicjax.models import seq_model
from slicjax.models.transformer import EncoderDecoderTransformer, TransformerConfig, TransformerLM

FAMILIES = ("transformer", "ssm", "diffusion")

# Named sizes used by the demo, tests and benchmarks.
PRESETS: dict[str, dict[str, Any]] = {
  "tiny": dict(d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128, num_layers=2),
  "small": dict(d_model=128, num_heads=4, num_kv_heads=4, head_dim=32, d_ff=512, num_layers=3),
  "10m": dict(d_model=256, num_heads=8, num_kv_heads=8, head_dim=32, d_ff=1024, num_layers=8,
              vocab_size=8192),
  "100m": dict(d_model=768, num_heads=12, num_kv_heads=12, head_dim=64, d_ff=3072,
               num_layers=12, vocab_size=32000),
}


def _as_dict(config) -> dict[str, Any]:
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, dict):
    raise TypeError(f"model config must be a dict or ConfigDict, got {type(config).__name__}.")
  return dict(config)


def _dataclass_from(cls, d: dict[str, Any], what: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown {what} config key(s) {unknown}; valid keys are {sorted(known)}.")
  return cls(**d)


def build_model(config) -> seq_model.SeqModel:
  """Returns the adapter for ``config`` (a dict or ``ml_collections.ConfigDict``).

  ``preset`` (optional) names an entry of :data:`PRESETS` whose values the other keys override.
  """
  d = _as_dict(config)
  family = d.pop("family", "transformer")
  preset = d.pop("preset", None)
  if preset is not None:
    if preset not in PRESETS:
      raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}.")
    d = {**PRESETS[preset], **d}
  if family == "transformer":
    cfg = TransformerConfig.from_dict(d)
    if cfg.is_encoder_decoder:
      return seq_model.EncoderDecoder(
        EncoderDecoderTransformer(cfg), cfg.max_len, cfg.vocab_size, "transformer",
        decoder_start_id=cfg.decoder_start_id,
      )
    return seq_model.PrefixLM(TransformerLM(cfg), cfg.max_len, cfg.vocab_size, "transformer")
  if family == "ssm":
    from slicjax.models import ssm

    if preset is not None:  # presets are written for transformers: translate their sizes
      for k in ("num_heads", "num_kv_heads", "head_dim", "d_ff"):
        d.pop(k, None)
      if "num_layers" in d:
        d.setdefault("n_layers", d.pop("num_layers"))
    max_len = d.pop("max_len", 1 << 30)
    cfg = _dataclass_from(ssm.SSMConfig, d, "ssm")
    return seq_model.PrefixLM(ssm.SSMLM(cfg), max_len, cfg.vocab_size, "ssm")
  if family == "diffusion":
    from slicjax.models import diffusion_seq

    return diffusion_seq.build(d)
  raise ValueError(f"unknown model family {family!r}; choose from {FAMILIES}.")
