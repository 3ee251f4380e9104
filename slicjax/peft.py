"""Parameter-efficient fine-tuning: LoRA adapters over any :class:`SeqModel`, and merge-on-export.

:func:`add_lora` wraps a model and its (pretrained) params::

  lora_model, params = peft.add_lora(model, params, rank=8, targets="query|value", rng=rng)

The params become ``{"base": <the model's params>, "lora": <adapters>}``; the adapter tree
mirrors the base tree down to each targeted kernel, where it holds ``{"a": [in, r], "b": [r,
out]}`` (``in`` is the product of the kernel's input axes: one for query/key/value ``[D, H, K]``
and MLP kernels, two for the attention ``out`` kernel ``[H, K, D]``). Every
:class:`LoRAModel` method uses the kernel ``W + (a @ b).reshape(W.shape) * alpha / rank`` with a
``stop_gradient`` on the whole base, then delegates to the wrapped model, so losses, scoring and
decoding work unchanged. ``b`` starts at zero: a fresh adapter leaves the model's outputs
exactly as they were.

Training: :func:`slicjax.optim.make_optimizer` recognises LoRA trees and freezes ``^base/`` by
itself (no optimizer state for the base, no weight decay on it); ``freeze`` patterns can freeze
adapters too (paths look like ``lora/decoder/layer_0/self_attention/query/kernel/a``).
:func:`slicjax.training.create_train_state` works with a :class:`LoRAModel` as with any model:
the base keeps its logical-axis shardings and the adapters are replicated (they are small).
Checkpoints hold the whole ``{"base", "lora"}`` tree. :func:`merge` folds the adapters into the
base and returns the plain model and params, for export or fast inference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import zlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slicjax import optim
from slicjax.models.seq_model import SeqModel

DEFAULT_TARGETS = "query|value"
ALL_TARGETS = "query|key|value|out|gate|up|down"
# Methods of some SeqModels (diffusion) that take params first; LoRAModel merges then forwards.
_PARAM_METHODS = ("sequence_logprob", "mle_loss", "generate")


def trainable_freeze_pattern() -> str:
  """The ``freeze`` pattern that keeps a LoRA run's base fixed: ``"^base/"``.

  :func:`slicjax.optim.make_optimizer` already applies it to LoRA trees; it is exposed for
  custom optimizers and for :func:`count_params` on non-LoRA-shaped trees.
  """
  return optim.LORA_BASE_PATTERN


def is_lora(params) -> bool:
  """Whether ``params`` is a LoRA tree: a mapping with exactly the keys ``base`` and ``lora``."""
  return isinstance(params, Mapping) and set(params.keys()) == {"base", "lora"}


def count_params(params, freeze: str = "") -> tuple[int, int]:
  """``(trainable, total)`` scalar counts of ``params`` under the optimizer's ``freeze`` rules.

  LoRA trees count their base as frozen, as :func:`slicjax.optim.make_optimizer` does.

  Raises:
    ValueError: a ``freeze`` pattern is invalid or matches no parameter.
  """
  params = nn.unbox(params)
  flags = optim.frozen_flags(params, freeze, allow_all=True)
  sizes = [math.prod(getattr(x, "shape", ())) for x in jax.tree.leaves(params)]
  return sum(s for s, f in zip(sizes, flags) if not f), sum(sizes)


# --------------------------------------------------------------------------------------------
# Kernels and adapters


def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _kernels(base) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
  """``(keys, shape)`` of every LoRA-able kernel: leaves named ``kernel`` with 2 or 3 axes."""
  flat, _ = jax.tree_util.tree_flatten_with_path(base)
  out = []
  for path, leaf in flat:
    keys = tuple(_key_str(k) for k in path)
    shape = tuple(getattr(leaf, "shape", ()))
    if keys and keys[-1] == "kernel" and len(shape) in (2, 3):
      out.append((keys, shape))
  return out


def _in_out(keys: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, int]:
  """The kernel as a matrix: attention ``out`` ``[H, K, D]`` contracts two input axes, every
  other kernel (Dense ``[in, out]``, query/key/value ``[D, H, K]``) one."""
  n_in = 2 if len(shape) == 3 and len(keys) >= 2 and keys[-2] == "out" else 1
  return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def _target_regex(targets: str) -> re.Pattern:
  """``targets`` matched as whole path components: ``out`` matches ``.../out/kernel`` but not
  ``.../out_proj/kernel``."""
  if not isinstance(targets, str) or not targets:
    raise ValueError(
      f"LoRA targets must be a non-empty regex over kernel paths, got {targets!r}; e.g. "
      f"{DEFAULT_TARGETS!r} or {ALL_TARGETS!r}."
    )
  try:
    return re.compile(rf"(?:^|/)(?:{targets})(?:/|$)")
  except re.error as e:
    raise ValueError(f"LoRA targets {targets!r} is not a valid regular expression ({e}).") from None


def _targeted(base, targets: str):
  stacked = [p for p in (_path for _path, _ in jax.tree_util.tree_flatten_with_path(base)[0])
             if "layers" in [_key_str(k) for k in p]]
  if stacked:
    raise ValueError(
      "LoRA needs one kernel per layer, but these params are a scanned layer stack "
      "(scan_layers=True: a leading layer axis under .../layers/...); unstack them with "
      "slicjax.models.transformer.unstack_layer_params and build the model with "
      "scan_layers=False."
    )
  regex = _target_regex(targets)
  kernels = _kernels(base)
  chosen = [(k, s) for k, s in kernels if regex.search("/".join(k))]
  if not chosen:
    available = ["/".join(k) for k, _ in kernels]
    raise ValueError(
      f"LoRA targets {targets!r} match no kernel (matched against whole path components); "
      f"available kernel paths: {available}. Use e.g. {DEFAULT_TARGETS!r} (attention query and "
      f"value), {ALL_TARGETS!r} (all projections) or a path such as 'layer_0/mlp/up'."
    )
  return chosen


def _init_lora(base, targets: str, rank: int, rng, *, boxed: bool) -> dict:
  """Adapters for every targeted kernel of ``base`` (unboxed arrays or shape structs)."""
  lora: dict[str, Any] = {}
  for keys, shape in _targeted(base, targets):
    n_in, n_out = _in_out(keys, shape)
    key = jax.random.fold_in(rng, zlib.crc32("/".join(keys).encode()) & 0x7FFFFFFF)
    a = jax.random.normal(key, (n_in, rank), jnp.float32) / math.sqrt(n_in)
    b = jnp.zeros((rank, n_out), jnp.float32)
    if boxed:  # replicated: adapters are small; names keep every param leaf boxed alike
      a, b = nn.LogicallyPartitioned(a, (None, None)), nn.LogicallyPartitioned(b, (None, None))
    node = lora
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = {"a": a, "b": b}
  return lora


def _merge_kernel(w, adapter, keys, rank: int, scale: float):
  path = "/".join(keys)
  if not (isinstance(adapter, Mapping) and set(adapter.keys()) == {"a", "b"}):
    raise ValueError(
      f"LoRA adapter at {path} must be {{'a', 'b'}}, got {type(adapter).__name__}; the params "
      "do not come from slicjax.peft.add_lora."
    )
  a, b = adapter["a"], adapter["b"]
  n_in, n_out = _in_out(keys, tuple(w.shape))
  if tuple(a.shape) != (n_in, rank) or tuple(b.shape) != (rank, n_out):
    raise ValueError(
      f"LoRA adapter at {path} has a {tuple(a.shape)}, b {tuple(b.shape)} but the kernel "
      f"{tuple(w.shape)} at rank {rank} needs a {(n_in, rank)}, b {(rank, n_out)}; build the "
      "LoRAModel with the rank the adapters were created with."
    )
  delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
  return (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)


def _merge_tree(base, lora, rank: int, scale: float, stop: bool, keys=()):
  hold = jax.lax.stop_gradient if stop else (lambda x: x)
  if not isinstance(base, Mapping):
    raise ValueError(
      f"LoRA adapters at {'/'.join(keys)} sit on a non-dict base entry; the adapters do not "
      "belong to these base params."
    )
  extra = sorted(set(lora.keys()) - set(base.keys()))
  if extra:
    raise ValueError(
      f"LoRA adapters {['/'.join(keys + (k,)) for k in extra]} have no base parameter; the "
      "adapters do not belong to these base params."
    )
  out = {}
  for k, v in base.items():
    sub = lora.get(k)
    if sub is None:
      out[k] = jax.tree.map(hold, v)
    elif isinstance(v, Mapping):
      out[k] = _merge_tree(v, sub, rank, scale, stop, keys + (k,))
    else:
      out[k] = _merge_kernel(hold(v), sub, keys + (k,), rank, scale)
  return out


# --------------------------------------------------------------------------------------------
# The model


def _check_hparams(rank, alpha, targets):
  if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
    raise ValueError(f"LoRA rank must be an int > 0, got {rank!r}; typical values are 4-64.")
  if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha)
      or alpha <= 0):
    raise ValueError(
      f"LoRA alpha must be a finite number > 0, got {alpha!r}; the adapter scale is alpha/rank "
      "(alpha = 2 * rank is common)."
    )
  _target_regex(targets)


@dataclasses.dataclass(frozen=True)
class LoRAModel(SeqModel):
  """A :class:`SeqModel` whose params are ``{"base": inner params, "lora": adapters}``.

  Build it with :func:`add_lora` (new adapters) or :meth:`wrap` (e.g. to use adapters restored
  from a checkpoint, with the same ``rank``/``alpha``/``targets``). ``module``, ``max_len``,
  ``vocab_size`` and ``family`` are the inner model's; other data attributes of the inner model
  (``separator_id``, ``decoder_start_id``) read through.
  """

  inner: SeqModel | None = None
  rank: int = 8
  alpha: float = 16.0
  targets: str = DEFAULT_TARGETS

  def __post_init__(self):
    inner = self.inner
    if not isinstance(inner, SeqModel):
      raise ValueError(
        f"LoRAModel.inner must be a SeqModel, got {type(inner).__name__}; build one with "
        "LoRAModel.wrap(model, ...) or slicjax.peft.add_lora."
      )
    if isinstance(inner, LoRAModel):
      raise ValueError(
        "the model already has LoRA adapters; merge them first (slicjax.peft.merge) to stack "
        "a new set."
      )
    _check_hparams(self.rank, self.alpha, self.targets)
    mine = (self.module, self.max_len, self.vocab_size, self.family)
    if mine != (inner.module, inner.max_len, inner.vocab_size, inner.family):
      raise ValueError(
        "LoRAModel's module/max_len/vocab_size/family differ from its inner model's; build it "
        "with LoRAModel.wrap(inner, ...)."
      )

  @classmethod
  def wrap(
    cls, inner: SeqModel, *, rank: int = 8, alpha: float = 16.0, targets: str = DEFAULT_TARGETS
  ) -> LoRAModel:
    """``inner`` with adapters of the given shape (no params are made; see :func:`add_lora`).

    Raises:
      ValueError: ``inner`` is not a plain SeqModel, or bad ``rank``/``alpha``/``targets``.
    """
    if not isinstance(inner, SeqModel):
      raise ValueError(f"LoRAModel.wrap needs a SeqModel, got {type(inner).__name__}.")
    return cls(inner.module, inner.max_len, inner.vocab_size, inner.family, inner=inner,
               rank=rank, alpha=alpha, targets=targets)

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)

  def merged_params(self, params, *, stop_gradient: bool = True):
    """The inner model's params with the adapters folded in (base under ``stop_gradient``).

    Raises:
      ValueError: ``params`` is not a ``{"base", "lora"}`` tree that fits this model.
    """
    if not is_lora(params):
      got = sorted(params.keys()) if isinstance(params, Mapping) else type(params).__name__
      raise ValueError(
        f"LoRAModel needs params {{'base': ..., 'lora': ...}} (from slicjax.peft.add_lora), got "
        f"{got}; for plain params use the inner model (lora_model.inner)."
      )
    return _merge_tree(params["base"], params["lora"], int(self.rank), self.scale, stop_gradient)

  # --- SeqModel -------------------------------------------------------------------------------
  def init_fn(self, batch_size: int = 1, input_len: int = 8, target_len: int = 8):
    inner_fn = self.inner.init_fn(batch_size=batch_size, input_len=input_len,
                                  target_len=target_len)

    def init(rng):
      base_rng, lora_rng = jax.random.split(rng)
      variables = inner_fn(base_rng)
      base = variables["params"]
      lora = _init_lora(nn.unbox(base), self.targets, int(self.rank), lora_rng, boxed=True)
      return {**variables, "params": {"base": base, "lora": lora}}

    return init

  def target_logits(self, params, batch, *, return_hidden=False, deterministic=True, rngs=None):
    return self.inner.target_logits(
      self.merged_params(params), batch, return_hidden=return_hidden,
      deterministic=deterministic, rngs=rngs,
    )

  def candidate_logits(
    self, params, inputs_BxS, candidates_BxKxL, *, return_hidden=False, deterministic=True,
    rngs=None,
  ):
    return self.inner.candidate_logits(
      self.merged_params(params), inputs_BxS, candidates_BxKxL, return_hidden=return_hidden,
      deterministic=deterministic, rngs=rngs,
    )

  def decode_state(self, params, inputs_BxS, max_len: int):
    return self.inner.decode_state(self.merged_params(params), inputs_BxS, max_len)

  def _call_merged(self, name, params, *args, **kwargs):
    return getattr(self.inner, name)(self.merged_params(params), *args, **kwargs)

  def __getattr__(self, name):
    # Only reached for attributes LoRAModel lacks. Params-taking methods of some families
    # (diffusion) are forwarded with merged params; plain data attributes read through; any
    # other method would receive the wrong params, so it is refused.
    inner = self.__dict__.get("inner")
    if name.startswith("__") or inner is None:
      raise AttributeError(name)
    value = getattr(inner, name)
    if name in _PARAM_METHODS:
      return functools.partial(self._call_merged, name)
    if callable(value):
      raise AttributeError(
        f"LoRAModel does not forward {type(inner).__name__}.{name}; call "
        "slicjax.peft.merge(model, params) and use the merged model."
      )
    return value


def add_lora(
  model: SeqModel, params, *, rank: int = 8, alpha: float = 16.0,
  targets: str = DEFAULT_TARGETS, rng,
) -> tuple[LoRAModel, dict]:
  """Adds LoRA adapters to the kernels of ``params`` whose paths match ``targets``.

  Args:
    model: a plain SeqModel (not already a :class:`LoRAModel`).
    params: its params (e.g. a pretrained checkpoint); kept as the frozen base.
    rank: adapter rank ``r``.
    alpha: the update is scaled by ``alpha / rank``.
    targets: regex matched against whole components of '/'-joined kernel paths such as
      ``decoder/layer_0/self_attention/query/kernel``; :data:`DEFAULT_TARGETS` (attention query
      and value) or :data:`ALL_TARGETS` (query, key, value, out, gate, up, down).
    rng: PRNG key for ``a`` (Gaussian / sqrt(in)); ``b`` starts at zero.

  Returns:
    ``(lora_model, {"base": params, "lora": adapters})``.

  Raises:
    ValueError: ``model`` or ``params`` already has adapters, ``rank <= 0``, ``alpha <= 0``, or
      ``targets`` is invalid or matches no kernel (the message lists the kernel paths).
  """
  if isinstance(model, LoRAModel) or is_lora(params):
    raise ValueError(
      "the model/params already have LoRA adapters; merge them first (slicjax.peft.merge) to "
      "add a new set, or keep training the existing ones."
    )
  lora_model = LoRAModel.wrap(model, rank=rank, alpha=alpha, targets=targets)
  params = nn.unbox(params)
  lora = _init_lora(params, targets, int(rank), rng, boxed=False)
  return lora_model, {"base": params, "lora": lora}


def merge_params(params, *, rank: int, alpha: float):
  """Folds the adapters of a ``{"base", "lora"}`` tree into its base, without the model (what a
  workdir's checkpoint plus its config's ``lora.rank`` / ``lora.alpha`` are enough for).

  Raises:
    ValueError: ``params`` is not a LoRA tree, or its adapters do not fit ``rank``.
  """
  if not is_lora(params):
    raise ValueError("merge_params needs a {'base', 'lora'} tree from slicjax.peft.add_lora.")
  _check_hparams(rank, alpha, DEFAULT_TARGETS)
  return _merge_tree(
    nn.unbox(params["base"]), params["lora"], int(rank), float(alpha) / int(rank), False
  )


def merge(model: SeqModel, params) -> tuple[SeqModel, Any]:
  """Folds LoRA adapters into the base kernels: ``(inner_model, plain_params)``.

  The identity for a plain model with plain params, so callers can merge unconditionally
  before export (:mod:`slicjax.interop`) or decoding.

  Raises:
    ValueError: a :class:`LoRAModel` with plain params, or LoRA params with a plain model.
  """
  if isinstance(model, LoRAModel):
    return model.inner, model.merged_params(params, stop_gradient=False)
  if is_lora(params):
    raise ValueError(
      f"params hold LoRA adapters but the model is a plain {type(model).__name__}; pass the "
      "LoRAModel (from slicjax.peft.add_lora or LoRAModel.wrap with the same rank/alpha/targets)."
    )
  return model, params
