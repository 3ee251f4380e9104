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

``None`` means "unset" for every key (no dataclass field takes ``None``): :func:`build_model`
drops ``None`` values first, so a config may list every key of every family
(:func:`model_config`: typed placeholders, overridable from the command line as
``--config.model.num_layers=2``) and an unset key falls back to the preset's value, else the
family's default. A key that no family knows still raises.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
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


# The keys of ``family="diffusion"`` besides the transformer's (``diffusion_seq.ADAPTER_KEYS``).
DIFFUSION_KEY_TYPES: dict[str, type] = dict(schedule=str, num_elbo_samples=int,
                                            sampler_threshold=float, sampler=str,
                                            sampler_factor=float, block_length=int, shift=bool,
                                            causal_prompt=bool, eos_fill=bool)


def _field_types(cls) -> dict[str, type]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def family_keys() -> dict[str, dict[str, type]]:
  """``{family: {key: type}}``: every key :func:`build_model` accepts for each family (``ssm``
  includes the encoder-decoder keys of ``num_encoder_layers > 0``)."""
  from slicjax.models import ssm_encdec

  common = dict(family=str, preset=str)
  transformer = _field_types(TransformerConfig)
  return dict(
    transformer={**common, **transformer},
    ssm={**common, **_field_types(ssm_encdec.SSMEncDecConfig), "num_layers": int},
    diffusion={**common, **transformer, **DIFFUSION_KEY_TYPES},
  )


def model_keys() -> dict[str, type]:
  """``{key: type}`` over all families: the keys a ``model`` config section may hold."""
  out: dict[str, type] = {}
  for keys in family_keys().values():
    for k, t in keys.items():
      if out.setdefault(k, t) is not t:
        raise TypeError(f"model key {k!r} has type {out[k]} in one family and {t} in another.")
  return out


def model_config(**values):
  """A ``model`` config section (``ml_collections.ConfigDict``) holding every key of
  :func:`model_keys`: ``values`` as given, every other key a typed placeholder (``None``: unset,
  so the preset's value or the family's default applies; still settable from the command line).

  Raises:
    ValueError: a key of ``values`` that no model family accepts.
  """
  from ml_collections import config_dict

  keys = model_keys()
  unknown = sorted(set(values) - set(keys))
  if unknown:
    raise ValueError(f"unknown model config key(s) {unknown}; valid keys are {sorted(keys)}.")
  return config_dict.ConfigDict(
    {k: values[k] if k in values else config_dict.placeholder(t) for k, t in keys.items()}
  )


def resolved_defaults(family: str = "transformer", preset: str | None = None) -> dict[str, Any]:
  """The value each key of ``family`` takes when unset: the preset's, else the dataclass
  default (for ``ssm`` the decoder-only :class:`~slicjax.models.ssm.SSMConfig`'s, with the
  encoder keys' defaults from the encoder-decoder's)."""
  from slicjax.models import diffusion_seq, ssm_encdec

  if family == "ssm":
    out = {f.name: f.default for f in dataclasses.fields(ssm_encdec.SSMEncDecConfig)}
    out["num_encoder_layers"] = 0
    p = dict(PRESETS.get(preset, {}))
    if "num_layers" in p:
      out["n_layers"] = p.pop("num_layers")
    return {**out, **p}
  out = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
  if family == "diffusion":
    ds = {f.name: f.default for f in dataclasses.fields(diffusion_seq.DiffusionSeq2Seq)}
    out.update(schedule="linear", num_elbo_samples=ds["num_elbo_samples"],
               sampler_threshold=ds["sampler_threshold"], sampler=ds["sampler"],
               sampler_factor=ds["sampler_factor"], eos_fill=ds["eos_fill"], block_length=0,
               shift=False, causal_prompt=False, causal=False)
  return {**out, **PRESETS.get(preset, {})}


def effective_model_config(config) -> dict[str, Any]:
  """Every key of ``config``'s family with the value :func:`build_model` uses: the set keys,
  else the preset's value, else the family's default (unset keys resolved, for messages that
  compare two model configs)."""
  d = _as_dict(config)
  family = d.get("family") or "transformer"
  preset = d.get("preset")
  if family == "ssm" and preset is not None and "num_layers" in d:
    d.setdefault("n_layers", d.pop("num_layers"))
  return {**resolved_defaults(family, preset), **d}


def _as_dict(config) -> dict[str, Any]:
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if not isinstance(config, dict):
    raise TypeError(f"model config must be a dict or ConfigDict, got {type(config).__name__}.")
  return {k: v for k, v in config.items() if v is not None}  # None: unset (see module doc)


def _dataclass_from(cls, d: dict[str, Any], what: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown {what} config key(s) {unknown}; valid keys are {sorted(known)}.")
  return cls(**d)


def build_model(config) -> seq_model.SeqModel:
  """Returns the adapter for ``config`` (a dict or ``ml_collections.ConfigDict``).

  ``preset`` (optional) names an entry of :data:`PRESETS` whose values the other keys override.
  ``None``-valued keys are unset (dropped before validation).
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
