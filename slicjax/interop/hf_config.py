"""Config translation between Hugging Face config.json files and slicjax ``TransformerConfig``.

Two families are supported:

* ``llama``: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (RoPE in the
  half-split layout, grouped-query attention, SwiGLU, RMSNorm, tied or untied output head,
  Qwen2's query/key/value biases) <-> :class:`~slicjax.models.transformer.TransformerLM`;
* ``t5``: ``T5ForConditionalGeneration`` (T5 v1.0 ReLU, T5 v1.1 / Flan-T5 gated-GELU, gated-SiLU;
  tied or untied head) <-> :class:`~slicjax.models.transformer.EncoderDecoderTransformer`.
"""

from __future__ import annotations

from typing import Any

from slicjax.models.transformer import TransformerConfig

# Architecture name (config.json "architectures") -> family; model_type as a fallback.
ARCHITECTURES = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "llama",
  "Qwen2ForCausalLM": "llama",
  "T5ForConditionalGeneration": "t5",
}
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "t5": "t5"}


def family_of(hf: dict[str, Any]) -> tuple[str, str]:
  """``(family, architecture)`` from a config.json dict.

  Raises:
    ValueError: for an architecture slicjax cannot load, listing the supported ones.
  """
  archs = hf.get("architectures") or []
  for a in archs:
    if a in ARCHITECTURES:
      return ARCHITECTURES[a], a
  mt = hf.get("model_type")
  if not archs and mt in MODEL_TYPES:
    return MODEL_TYPES[mt], mt
  raise ValueError(
    f"unsupported architecture {archs or mt!r} in config.json; slicjax loads "
    f"{sorted(ARCHITECTURES)}. Convert the checkpoint to one of them or load it with transformers."
  )


def _rope_theta(hf: dict[str, Any]) -> float:
  rp = hf.get("rope_parameters") or {}
  rs = hf.get("rope_scaling") or {}
  for src in (rp, rs):
    kind = src.get("rope_type", src.get("type", "default"))
    if kind not in ("default", None):
      raise ValueError(
        f"RoPE type {kind!r} (rope_scaling / rope_parameters) is not supported; slicjax "
        "implements the default (unscaled) RoPE only. Load a checkpoint without RoPE scaling."
      )
  return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _need(hf: dict[str, Any], key: str, arch: str) -> int:
  if hf.get(key) is None:
    raise ValueError(
      f"config.json ({arch}) lacks {key!r}; use the config.json saved with the checkpoint."
    )
  return int(hf[key])


def _require(cond: bool, msg: str):
  if not cond:
    raise ValueError(msg)


def config_from_hf(
  hf: dict[str, Any],
  tensor_names,
  *,
  max_len: int | None = None,
  dtype: str = "float32",
  param_dtype: str | None = None,
) -> tuple[str, TransformerConfig, float]:
  """Translates a config.json dict into ``(family, TransformerConfig, head_scale)``.

  ``tensor_names`` (the checkpoint's tensor names) decides whether a T5 head is tied: an
  ``lm_head.weight`` in the file means untied. ``head_scale`` is a factor to fold into an
  untied output head (T5 checkpoints that scale decoder outputs by ``d_model**-0.5``).

  Raises:
    ValueError: for a config feature slicjax does not implement, naming the key; for a Llama-family
      ``max_len`` beyond ``max_position_embeddings`` (or a sliding window).
  """
  family, arch = family_of(hf)
  names = set(tensor_names)
  common = dict(dtype=dtype, param_dtype=param_dtype or dtype, dropout_rate=0.0)
  if family == "llama":
    act = hf.get("hidden_act", "silu")
    _require(
      act == "silu", f"{arch}: hidden_act={act!r} is not supported; slicjax's SwiGLU uses silu."
    )
    _require(
      not hf.get("mlp_bias", False),
      f"{arch}: mlp_bias=true is not supported; slicjax's Llama MLP has no biases.",
    )
    qkv_bias = arch == "Qwen2ForCausalLM" or hf.get("model_type") == "qwen2"
    _require(
      not hf.get("attention_bias", False),
      f"{arch}: attention_bias=true (biases on q/k/v/o) is not supported; only Qwen2's q/k/v "
      "biases are.",
    )
    d, h = _need(hf, "hidden_size", arch), _need(hf, "num_attention_heads", arch)
    head_dim = hf.get("head_dim") or d // h
    limit = int(hf.get("max_position_embeddings", 2048))
    if max_len is not None and hf.get("max_position_embeddings") and max_len > limit:
      raise ValueError(
        f"{arch}: max_len={max_len} exceeds the model's context length "
        f"(max_position_embeddings={limit}); positions beyond it were never trained. Pass "
        f"max_len <= {limit}, or None for the full context."
      )
    window = hf.get("sliding_window")
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
      window = None
    if window:  # attention equals full attention for sequences that fit in the window
      limit = min(limit, int(window))
    if max_len is not None and window and max_len > int(window):
      raise ValueError(
        f"{arch}: max_len={max_len} exceeds the sliding window ({window}); slicjax has no "
        "sliding-window attention, so pass max_len <= the window."
      )
    tie = bool(hf.get("tie_word_embeddings", False))
    cfg = TransformerConfig(
      vocab_size=_need(hf, "vocab_size", arch),
      d_model=d,
      num_heads=h,
      num_kv_heads=int(hf.get("num_key_value_heads") or h),
      head_dim=int(head_dim),
      d_ff=_need(hf, "intermediate_size", arch),
      num_layers=_need(hf, "num_hidden_layers", arch),
      num_encoder_layers=0,
      norm="rms",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      position="rope",
      rope_theta=_rope_theta(hf),
      mlp="swiglu",
      tie_embeddings=tie,
      tied_logit_scale=False,
      scale_queries=True,
      use_bias=False,
      qkv_bias=qkv_bias,
      causal=True,
      max_len=int(max_len or limit),
      **common,
    )
    cfg.validate()
    return family, cfg, 1.0

  proj = hf.get("feed_forward_proj", "relu")
  mlp = {"relu": "relu", "gated-gelu": "geglu", "gated-silu": "swiglu"}.get(proj)
  _require(
    mlp is not None,
    f"T5 feed_forward_proj={proj!r} is not supported; slicjax maps 'relu', 'gated-gelu' "
    "(tanh GELU) and 'gated-silu'.",
  )
  untied = "lm_head.weight" in names
  scale = hf.get("scale_decoder_outputs")
  if scale is None:  # transformers 4.x: tied embeddings imply the d_model**-0.5 output scale
    scale = hf.get("tie_word_embeddings", True) is not False
  d = _need(hf, "d_model", arch)
  cfg = TransformerConfig(
    vocab_size=_need(hf, "vocab_size", arch),
    d_model=d,
    num_heads=_need(hf, "num_heads", arch),
    num_kv_heads=_need(hf, "num_heads", arch),
    head_dim=_need(hf, "d_kv", arch),
    d_ff=_need(hf, "d_ff", arch),
    num_layers=int(hf.get("num_decoder_layers") or _need(hf, "num_layers", arch)),
    num_encoder_layers=_need(hf, "num_layers", arch),
    norm="rms",
    norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
    position="relative",
    relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
    relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
    mlp=mlp,
    tie_embeddings=not untied,
    tied_logit_scale=bool(scale) and not untied,
    scale_queries=False,
    use_bias=False,
    causal=True,
    max_len=int(max_len or hf.get("n_positions") or 512),
    decoder_start_id=int(hf.get("decoder_start_token_id") or 0),
    **common,
  )
  cfg.validate()
  return family, cfg, (d**-0.5 if (scale and untied) else 1.0)


def _check_exportable(cfg: TransformerConfig, family: str):
  fields = []

  def want(name, value):
    if getattr(cfg, name) != value:
      fields.append(f"{name}={getattr(cfg, name)!r} (needs {value!r})")

  want("norm", "rms")
  want("use_bias", False)
  want("causal", True)
  if family == "llama":
    want("position", "rope")
    want("mlp", "swiglu")
    want("scale_queries", True)
    if cfg.tie_embeddings:
      want("tied_logit_scale", False)
  else:
    want("position", "relative")
    want("qkv_bias", False)
    if cfg.num_kv_heads != cfg.num_heads:
      fields.append(f"num_kv_heads={cfg.num_kv_heads} (T5 has no grouped-query attention)")
    if cfg.mlp not in ("relu", "geglu", "swiglu"):
      fields.append(f"mlp={cfg.mlp!r} (needs relu, geglu or swiglu)")
  if fields:
    arch = (
      "LlamaForCausalLM/Qwen2ForCausalLM" if family == "llama" else "T5ForConditionalGeneration"
    )
    raise ValueError(
      f"this model cannot be exported as {arch}: {', '.join(fields)}. Only configs that the "
      "Hugging Face architecture expresses can be exported."
    )


def config_to_hf(cfg: TransformerConfig, *, dtype: str = "float32") -> tuple[str, dict[str, Any]]:
  """``(family, config.json dict)`` for a slicjax transformer config.

  Decoder-only models become ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` with ``qkv_bias``);
  encoder-decoders become ``T5ForConditionalGeneration``. Special ids follow slicjax's
  conventions (pad 0, eos 1, bos 2).

  Raises:
    ValueError: naming every config field the target architecture cannot express.
  """
  family = "t5" if cfg.is_encoder_decoder else "llama"
  _check_exportable(cfg, family)
  if family == "llama":
    arch, mt = ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama")
    out = dict(
      architectures=[arch],
      model_type=mt,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model,
      intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      hidden_act="silu",
      max_position_embeddings=cfg.max_len,
      rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      tie_word_embeddings=cfg.tie_embeddings,
      attention_dropout=cfg.dropout_rate,
      bos_token_id=2,
      eos_token_id=1,
      pad_token_id=0,
      use_cache=True,
    )
    if cfg.qkv_bias:
      out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    else:
      out.update(attention_bias=False, mlp_bias=False)
  else:
    proj = {"relu": "relu", "geglu": "gated-gelu", "swiglu": "gated-silu"}[cfg.mlp]
    # Tied with the output scale: the classic T5 layout. Anything else is written with an
    # explicit lm_head and no output scale, which every transformers version reads alike.
    tied = cfg.tie_embeddings and cfg.tied_logit_scale
    out = dict(
      architectures=["T5ForConditionalGeneration"],
      model_type="t5",
      vocab_size=cfg.vocab_size,
      d_model=cfg.d_model,
      d_kv=cfg.head_dim,
      d_ff=cfg.d_ff,
      num_layers=cfg.num_encoder_layers,
      num_decoder_layers=cfg.num_layers,
      num_heads=cfg.num_heads,
      relative_attention_num_buckets=cfg.relative_buckets,
      relative_attention_max_distance=cfg.relative_max_distance,
      dropout_rate=cfg.dropout_rate,
      layer_norm_epsilon=cfg.norm_eps,
      feed_forward_proj=proj,
      is_encoder_decoder=True,
      tie_word_embeddings=tied,
      scale_decoder_outputs=tied,
      n_positions=cfg.max_len,
      decoder_start_token_id=cfg.decoder_start_id,
      pad_token_id=0,
      eos_token_id=1,
      use_cache=True,
    )
  out["torch_dtype"] = dtype  # transformers 4.x
  out["dtype"] = dtype  # transformers 5.x
  return family, out
