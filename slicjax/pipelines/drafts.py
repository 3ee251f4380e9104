"""Speculative-decoding drafts for the pipelines' greedy and sampled decoding.

``candidates.draft`` / ``rso.draft`` (with ``num_draft``, the draft tokens per round):

* ``"none"`` (default): decode with the model alone;
* ``"layer_skip:N"``: the model's own first ``N`` blocks, final norm and head (nothing to train;
  see :func:`slicjax.decoding.speculative.layer_skip_draft`);
* a path: a workdir of a training run (e.g. a small model trained with ``experiments/train.py``
  on the target's own greedy outputs, i.e. distilled), a ``.gguf`` file or a Hugging Face
  directory with the same vocabulary.

The output is what the model alone produces (greedy: token for token; sampling: the same
distribution), so the draft changes only the speed. Beam search takes no draft.
"""

from __future__ import annotations

from typing import Any

from absl import logging

DRAFT_KEYS = dict(draft="none", num_draft=4)
_CACHE: dict[Any, Any] = {}


def check(c: dict[str, Any], section: str) -> None:
  """Config-time checks of ``draft`` / ``num_draft`` (and that the method can use a draft)."""
  from slicjax.pipelines import validation

  spec = str(c["draft"]).strip()
  if spec.lower() in ("", "none"):
    return
  validation.count(c["num_draft"], f"{section}.num_draft")
  if c.get("method", "sample") not in ("greedy", "sample"):
    raise ValueError(
      f"{section}.draft={spec!r} speeds up greedy decoding and sampling, not "
      f"{section}.method={c['method']!r}; set {section}.draft=none or method=greedy/sample."
    )
  if spec.startswith("layer_skip:"):
    validation.count(_layers(spec, section), f"{section}.draft layer_skip:N")
  else:
    validation.file_or_dir(spec, f"{section}.draft",
                           "give 'none', 'layer_skip:N' or a draft run's workdir / checkpoint")


def _layers(spec: str, section: str) -> int:
  try:
    return int(spec.split(":", 1)[1])
  except ValueError:
    raise ValueError(f"{section}.draft={spec!r}: write layer_skip:N with N an integer.") from None


def load(spec: str, model, params, section: str):
  """``(draft_model, draft_params)`` for ``spec``, or ``None`` for ``"none"``."""
  spec = str(spec).strip()
  if spec.lower() in ("", "none"):
    return None
  from slicjax.decoding import speculative

  if spec.startswith("layer_skip:"):
    draft = speculative.layer_skip_draft(model, params, _layers(spec, section))
  else:
    key = (spec, model.max_len)
    if key not in _CACHE:
      from slicjax.interop import pretrained

      _CACHE.clear()
      d_model, d_params, _ = pretrained.load_pretrained(spec, max_len=model.max_len)
      _CACHE[key] = (d_model, d_params)
    draft = _CACHE[key]
  speculative.check_pair(model, draft[0])
  logging.info("%s: speculative decoding with draft %s", section, spec)
  return draft


def decode_args(method: str, options: dict[str, Any], draft, num_draft: int | None):
  """``(method, options)`` for ``slicjax.decoding.api.decode``: ``speculative`` with the draft
  when one is given (greedy -> temperature 0; sampling keeps its options), else unchanged."""
  if draft is None:
    return method, options
  from slicjax.decoding import api

  opts = {k: v for k, v in options.items() if k in api.OPTIONS["speculative"]}
  if method == "greedy":
    opts["temperature"] = 0.0
  return "speculative", dict(opts, num_draft=int(num_draft), draft=draft)
