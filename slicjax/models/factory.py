"""Builds a :class:`~slicjax.models.seq_model.SeqModel` from a plain config dict.

``family`` picks the decoder family: ``transformer`` (decoder-only when ``num_encoder_layers``
is 0, else encoder-decoder), ``ssm`` (``models/ssm.py``) or ``diffusion``
(``models/diffusion.py``, a bidirectional transformer backbone). Every other key is a field of
that family's config dataclass; unknown keys raise.

``ssm`` takes ``num_encoder_layers`` too: 0 (default) builds the decoder-only
:class:`~slicjax.models.ssm.SSMLM` (keys: :class:`~slicjax.models.ssm.SSMConfig` and ``max_len``);
``> 0`` builds :class:`~slicjax.models.ssm_encdec.SSMEncoderDecoder`, a transformer encoder with
an SSM decoder (keys: :class:`~slicjax.models.ssm_encdec.SSMEncDecConfig`, i.e. the SSMConfig keys
plus ``num_heads``, ``num_kv_heads``, ``head_dim``, ``d_ff``, ``encoder_position``,
``encoder_mlp``, ``relative_buckets``, ``relative_max_distance``, ``max_len``,
``decoder_start_id``). With a ``preset``, ``num_layers`` becomes the SSM ``n_layers`` and the
preset's attention sizes size the encoder (they are dropped for the decoder-only model).
"""

from __future__ import annotations

import dataclasses
import numbers
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
    return _build_ssm(d, preset)
  if family == "diffusion":
    from slicjax.models import diffusion_seq

    return diffusion_seq.build(d)
  raise ValueError(f"unknown model family {family!r}; choose from {FAMILIES}.")


def _build_ssm(d: dict[str, Any], preset) -> seq_model.SeqModel:
  """``family="ssm"``: decoder-only :class:`~slicjax.models.ssm.SSMLM` (a prefix LM), or with
  ``num_encoder_layers > 0`` the :class:`~slicjax.models.ssm_encdec.SSMEncoderDecoder`."""
  from slicjax.models import ssm, ssm_encdec

  n_enc = d.pop("num_encoder_layers", 0)
  if isinstance(n_enc, bool) or not isinstance(n_enc, numbers.Integral) or n_enc < 0:
    raise ValueError(
      f"num_encoder_layers={n_enc!r} must be an int >= 0 (0: decoder-only SSM LM; > 0: SSM "
      f"decoder with a transformer encoder)."
    )
  if preset is not None and "num_layers" in d:  # presets are written for transformers
    d.setdefault("n_layers", d.pop("num_layers"))
  n_enc = int(n_enc)
  if n_enc > 0:  # a preset's attention sizes (num_heads, head_dim, d_ff) size the encoder
    cfg = _dataclass_from(
      ssm_encdec.SSMEncDecConfig, {**d, "num_encoder_layers": n_enc}, "ssm encoder-decoder"
    )
    return seq_model.EncoderDecoder(
      ssm_encdec.SSMEncoderDecoder(cfg), cfg.max_len, cfg.vocab_size, "ssm",
      decoder_start_id=cfg.decoder_start_id,
    )
  if preset is not None:  # the preset's attention sizes have no decoder-only SSM meaning
    for k in ("num_heads", "num_kv_heads", "head_dim", "d_ff"):
      d.pop(k, None)
  max_len = d.pop("max_len", 1 << 30)
  enc_only = sorted(
    {f.name for f in dataclasses.fields(ssm_encdec.SSMEncDecConfig)}
    - {f.name for f in dataclasses.fields(ssm.SSMConfig)} - {"max_len"}
  )
  misplaced = sorted(set(d) & set(enc_only))
  if misplaced:
    raise ValueError(
      f"ssm config key(s) {misplaced} only apply to the SSM encoder-decoder; set "
      f"num_encoder_layers > 0 to build one, or remove them for the decoder-only SSM LM."
    )
  cfg = _dataclass_from(ssm.SSMConfig, d, "ssm")
  return seq_model.PrefixLM(ssm.SSMLM(cfg), max_len, cfg.vocab_size, "ssm")
