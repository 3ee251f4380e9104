"""Optimizers and learning-rate schedules from config (optax).

Frozen parameter groups: the ``freeze`` key holds comma-separated regular expressions matched
(``re.search``) against '/'-joined parameter paths such as
``decoder/layer_0/self_attention/query/kernel``. Matching leaves get ``optax.set_to_zero()``; the
whole configured chain (clipping, the optimizer with its weight decay, ``MultiSteps``
accumulation) runs on the other leaves only, so the clipping norm sees trainable gradients only
and frozen leaves carry no optimizer state. LoRA parameter trees (``{"base", "lora"}``, see
:mod:`slicjax.peft`) always freeze ``^base/`` as well, whatever ``freeze`` says.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

DEFAULTS: dict[str, Any] = dict(
  name="adamw", learning_rate=1e-3, warmup_steps=0, schedule="cosine", decay_steps=0,
  end_lr_fraction=0.1, weight_decay=0.0, b1=0.9, b2=0.98, eps=1e-9, clip_norm=1.0,
  grad_accum_steps=1, freeze="",
)

_TRAINABLE, _FROZEN = "trainable", "frozen"
LORA_BASE_PATTERN = "^base/"  # frozen automatically in LoRA parameter trees


def make_schedule(cfg: dict[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup then ``cosine``, ``rsqrt``, ``linear`` or ``constant``."""
  lr, warm = float(cfg["learning_rate"]), int(cfg["warmup_steps"])
  decay = int(cfg.get("decay_steps") or max(total_steps - warm, 1))
  kind = cfg["schedule"]
  if kind == "cosine":
    after = optax.cosine_decay_schedule(lr, decay, alpha=cfg["end_lr_fraction"])
  elif kind == "linear":
    after = optax.linear_schedule(lr, lr * cfg["end_lr_fraction"], decay)
  elif kind == "rsqrt":
    def after(step):
      return lr * (max(warm, 1) ** 0.5) / ((step + max(warm, 1)) ** 0.5)
  elif kind == "constant":
    after = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown schedule {kind!r}; use cosine, linear, rsqrt or constant.")
  if warm <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


# --------------------------------------------------------------------------------------------
# Frozen parameter groups


def split_patterns(freeze: str) -> list[str]:
  """Splits a ``freeze`` string on the commas outside ``[...]`` and ``{...}`` (so ``a{1,2}``
  stays one pattern); blank entries are dropped and each entry is stripped.

  Raises:
    ValueError: if ``freeze`` is not a string, or an entry is not a valid regular expression.
  """
  if not isinstance(freeze, str):
    raise ValueError(
      f"optimizer freeze must be a string of comma-separated regular expressions, got "
      f"{freeze!r}; e.g. freeze='token_embed,decoder/layer_[0-3]/'."
    )
  parts, cur, brace, bracket, escaped = [], [], 0, False, False
  for ch in freeze:
    if escaped:
      escaped = False
    elif ch == "\\":
      escaped = True
    elif bracket:
      bracket = ch != "]"
    elif ch == "[":
      bracket = True
    elif ch == "{":
      brace += 1
    elif ch == "}":
      brace = max(brace - 1, 0)
    elif ch == "," and brace == 0:
      parts.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  parts.append("".join(cur))
  patterns = [p.strip() for p in parts if p.strip()]
  for p in patterns:
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(
        f"optimizer freeze pattern {p!r} is not a valid regular expression ({e}); fix it "
        "(patterns are separated by commas and matched with re.search against paths like "
        "'decoder/layer_0/mlp/up/kernel')."
      ) from None
  return patterns


def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_paths(tree) -> list[str]:
  """The '/'-joined path of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return ["/".join(_key_str(k) for k in path) for path, _ in flat]


def frozen_flags(params, freeze: str = "", *, allow_all: bool = False) -> list[bool]:
  """Whether each leaf of ``params`` (in ``jax.tree.leaves`` order) is frozen by ``freeze``.

  LoRA trees (:func:`slicjax.peft.is_lora`) also freeze :data:`LORA_BASE_PATTERN`.

  Raises:
    ValueError: a pattern matches no parameter (it names the pattern and example paths), or
      every parameter is frozen (unless ``allow_all``), or a pattern is not a valid regex.
  """
  from slicjax import peft  # lazy: peft imports this module

  patterns = split_patterns(freeze)
  paths = tree_paths(params)
  unmatched = [p for p in patterns if not any(re.search(p, path) for path in paths)]
  if unmatched:
    examples = paths[:4] + (["..."] if len(paths) > 4 else [])
    raise ValueError(
      f"optimizer freeze pattern(s) {unmatched} match no parameter; fix or remove them. "
      f"Patterns are matched with re.search against '/'-joined paths such as {examples}."
    )
  if peft.is_lora(params):
    patterns = patterns + [LORA_BASE_PATTERN]
  flags = [any(re.search(p, path) for p in patterns) for path in paths]
  if flags and all(flags) and not allow_all:
    raise ValueError(
      f"optimizer freeze={freeze!r} freezes every parameter ({len(flags)} leaves), so nothing "
      "would train; narrow the patterns (or, for a LoRA tree, add adapters with "
      "slicjax.peft.add_lora and do not freeze '^lora/')."
    )
  return flags


def _labels(freeze: str):
  def label_fn(tree):
    flags = frozen_flags(tree, freeze)
    treedef = jax.tree.structure(tree)
    return jax.tree.unflatten(treedef, [_FROZEN if f else _TRAINABLE for f in flags])

  return label_fn


def _split(trainable_tx: optax.GradientTransformation, freeze: str):
  return optax.multi_transform(
    {_TRAINABLE: trainable_tx, _FROZEN: optax.set_to_zero()}, _labels(freeze)
  )


def _lora_aware(plain: optax.GradientTransformation, split: optax.GradientTransformation):
  """``plain`` for ordinary trees (the optimizer state is exactly ``plain``'s, so existing
  checkpoints restore), ``split`` for LoRA trees (base frozen). The choice depends on the
  tree's structure only, so ``init`` and ``update`` always agree."""
  from slicjax import peft  # lazy: peft imports this module

  def init(params):
    return (split if peft.is_lora(params) else plain).init(params)

  def update(updates, state, params=None, **extra_args):
    tx = split if peft.is_lora(updates) else plain
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns ``(tx, schedule)``. ``cfg`` keys: see :data:`DEFAULTS`; unknown keys raise.

  ``freeze``: comma-separated regexes over '/'-joined parameter paths; matching leaves are not
  updated and hold no optimizer state (see the module docstring). A pattern that matches no
  parameter, or patterns that freeze everything, raise ``ValueError`` when ``tx.init`` first
  sees the params. LoRA trees (:mod:`slicjax.peft`) freeze their ``base`` automatically.

  Raises:
    ValueError: unknown keys, optimizer or schedule names, or an invalid ``freeze`` regex.
  """
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown optimizer config key(s) {unknown}; valid: {sorted(DEFAULTS)}.")
  cfg = {**DEFAULTS, **cfg}
  freeze = cfg["freeze"] or ""
  split_patterns(freeze)  # validate the regexes now, not at the first step
  schedule = make_schedule(cfg, total_steps)
  name = cfg["name"]
  if name == "adamw":
    opt = optax.adamw(schedule, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"],
                      weight_decay=cfg["weight_decay"])
  elif name == "adafactor":
    opt = optax.adafactor(schedule, weight_decay_rate=cfg["weight_decay"] or None)
  elif name == "sgd":
    opt = optax.sgd(schedule)
  else:
    raise ValueError(f"unknown optimizer {name!r}; use adamw, adafactor or sgd.")
  parts = []
  if cfg["clip_norm"]:
    parts.append(optax.clip_by_global_norm(cfg["clip_norm"]))
  parts.append(opt)
  tx = optax.chain(*parts)
  accum = int(cfg["grad_accum_steps"])
  if accum > 1:
    multi = optax.MultiSteps(tx, every_k_schedule=accum)
    plain, trainable = multi, multi.gradient_transformation()
  else:
    plain = trainable = tx
  split = _split(trainable, freeze)
  if split_patterns(freeze):
    return split, schedule
  return _lora_aware(plain, split), schedule
