"""One entry point over every decoding algorithm: ``decode(model, params, inputs, method=...)``.

``model`` is any object with ``model.decode_state(params, inputs, max_len) -> (tokens_to_logits,
init_tokens_B, cache)`` (the adapters in ``slicjax.models.seq_model`` implement it). The whole
decode (model prefill + search loop) is one ``jax.jit`` program with ``params``, ``inputs``,
``rng`` and ``example_ids`` as arguments; programs are cached per (model, method, max_len,
options), so decoding batch after batch compiles once.

``method="speculative"`` (:mod:`slicjax.decoding.speculative`) takes a second model:
``decode(model, params, inputs, method="speculative", draft=(draft_model, draft_params),
num_draft=4, ...)``. It is greedy (output equal to ``method="greedy"``) when ``temperature`` is
0 or not given and exact sampling (the distribution of ``method="sample"``) when ``temperature >
0`` (then ``rng`` is required and ``num_samples``, ``top_k``, ``top_p`` apply). The draft model
is part of the program cache key; its parameters are a jit argument like ``params``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slicjax.decoding import beam_search, sampling, speculative
from slicjax.decoding.types import DecodeResult

METHODS = ("beam", "greedy", "sample", "diverse_beam", "speculative")

_COMMON = ("eos_id", "pad_id", "min_len", "no_repeat_ngram_size")
OPTIONS: dict[str, tuple[str, ...]] = {
  "beam": ("beam_size", "alpha", "length_penalty_style", "finish_top_2k") + _COMMON,
  "diverse_beam": (
    "beam_size", "num_groups", "diversity_strength", "alpha", "length_penalty_style",
    "finish_top_2k",
  ) + _COMMON,
  "greedy": _COMMON,
  "sample": ("num_samples", "temperature", "top_k", "top_p") + _COMMON,
  # ``draft=(draft_model, draft_params)`` is required too; it is not a compiled-in option.
  "speculative": ("num_draft", "num_samples", "temperature", "top_k", "top_p") + _COMMON,
}
_REQUIRED: dict[str, tuple[str, ...]] = {
  "beam": ("beam_size",),
  "diverse_beam": ("beam_size", "num_groups", "diversity_strength"),
  "greedy": (),
  "sample": (),
  "speculative": ("num_draft",),
}

_STRING_OPTIONS = ("length_penalty_style",)

_COMPILED: dict[Any, Any] = {}


def _check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
  if method not in OPTIONS:
    raise ValueError(f"unknown decoding method {method!r}; valid methods are {list(METHODS)}.")
  valid = OPTIONS[method]
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(
      f"unknown option(s) {unknown} for method={method!r}; valid options are {list(valid)}."
    )
  missing = [k for k in _REQUIRED[method] if k not in options]
  if missing:
    example = "num_draft=4" if method == "speculative" else "beam_size=4"
    raise ValueError(f"method={method!r} needs the option(s) {missing}, e.g. {example}.")
  clean = {}
  for key, v in options.items():
    if isinstance(v, np.generic):
      v = v.item()
    if key in _STRING_OPTIONS and isinstance(v, str):
      clean[key] = v
      continue
    if v is not None and not isinstance(v, (int, float)):
      raise ValueError(f"option {key}={v!r} must be a Python number (it is compiled in).")
    clean[key] = v
  return clean


def _build(model, method: str, max_len: int, options: dict[str, Any], draft_model=None):
  if method == "speculative":

    def run_speculative(params, inputs, rng, example_ids) -> DecodeResult:
      target_params, draft_params = params
      return speculative.speculative_decode(
        model,
        target_params,
        draft_model,
        draft_params,
        inputs,
        max_len=max_len,
        rng=rng,
        example_ids_B=example_ids,
        **options,
      )

    return jax.jit(run_speculative)

  def run(params, inputs, rng, example_ids) -> DecodeResult:
    step, init_tokens_B, cache = model.decode_state(params, inputs, max_len)
    if method == "beam":
      return beam_search.beam_search(step, init_tokens_B, cache, max_len=max_len, **options)
    if method == "diverse_beam":
      return beam_search.diverse_beam_search(step, init_tokens_B, cache, max_len=max_len, **options)
    if method == "greedy":
      return sampling.greedy_search(step, init_tokens_B, cache, max_len=max_len, **options)
    return sampling.sample(
      step, init_tokens_B, cache, rng=rng, max_len=max_len, example_ids_B=example_ids, **options
    )

  return jax.jit(run)


def decode(
  model,
  params,
  inputs,
  *,
  method: str = "beam",
  max_len: int,
  rng=None,
  example_ids=None,
  **options,
) -> DecodeResult:
  """Decodes ``inputs`` with ``model`` and returns K candidates per input.

  Args:
    model: object with ``decode_state(params, inputs, max_len) -> (tokens_to_logits,
      init_tokens_B, cache)``.
    params: the model parameters (a jit argument, never baked into the program).
    inputs: int32 ``[B, S]`` prompts, as ``model.decode_state`` expects them.
    method: ``"beam"`` (:func:`~slicjax.decoding.beam_search.beam_search`), ``"diverse_beam"``
      (:func:`~slicjax.decoding.beam_search.diverse_beam_search`), ``"greedy"``
      (:func:`~slicjax.decoding.sampling.greedy_search`), ``"sample"``
      (:func:`~slicjax.decoding.sampling.sample`) or ``"speculative"``
      (:func:`~slicjax.decoding.speculative.speculative_decode`; needs ``draft``).
    max_len: tokens to generate at most.
    rng: PRNG key; required by ``"sample"`` and by ``"speculative"`` with ``temperature > 0``,
      ignored by the deterministic methods.
    example_ids: optional int ``[B]`` ids keying each input's sampling randomness (default
      ``arange(B)``); ignored by the deterministic methods.
    **options: the method's keyword arguments (Python numbers): beam: ``beam_size`` (required),
      ``alpha``, ``length_penalty_style`` (``"gnmt"`` or ``"power"``), ``finish_top_2k``;
      diverse_beam: ``beam_size``, ``num_groups``, ``diversity_strength`` (required), and the
      beam options; sample: ``num_samples``, ``temperature``, ``top_k``, ``top_p``;
      speculative: ``draft=(draft_model, draft_params)`` and ``num_draft`` (gamma, draft tokens
      per round; both required), ``temperature`` (default 0 = greedy), ``num_samples``,
      ``top_k``, ``top_p``; all: ``eos_id``, ``pad_id``, ``min_len``,
      ``no_repeat_ngram_size``.

  Returns:
    :class:`~slicjax.decoding.types.DecodeResult`.

  Raises:
    ValueError: unknown method or option, a missing required option, or ``rng`` missing for
      sampling (and every check of the chosen algorithm).
  """
  draft_model = draft_params = None
  if method == "speculative":
    draft = options.pop("draft", None)
    if draft is None:
      raise ValueError(
        "method='speculative' needs draft=(draft_model, draft_params), e.g. a smaller "
        "build_model(...) adapter with the same vocab_size and its parameters."
      )
    if not isinstance(draft, (tuple, list)) or len(draft) != 2:
      raise ValueError(
        f"draft must be a (draft_model, draft_params) pair, got {type(draft).__name__}."
      )
    draft_model, draft_params = draft
    speculative.check_pair(model, draft_model)
  if hasattr(model, "generate"):  # families that do not decode token by token (diffusion)
    return model.generate(params, inputs, method=method, max_len=max_len, rng=rng,
                          example_ids=example_ids, **options)
  if not hasattr(model, "decode_state"):
    raise ValueError(
      f"model {type(model).__name__} has no decode_state(params, inputs, max_len); pass a "
      f"slicjax.models adapter (e.g. from slicjax.models.factory.build_model)."
    )
  options = _check_options(method, options)
  if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
    raise ValueError(f"max_len must be an int >= 1, got {max_len!r}.")
  if method == "sample" and rng is None:
    raise ValueError("method='sample' needs rng, e.g. rng=jax.random.PRNGKey(0).")
  stochastic = method == "sample"
  if method == "speculative" and (options.get("temperature") or 0) > 0:
    stochastic = True
    if rng is None:
      raise ValueError(
        "method='speculative' with temperature > 0 samples and needs rng, e.g. "
        "rng=jax.random.PRNGKey(0); leave temperature at 0 for greedy speculative decoding."
      )
  if not stochastic:
    rng, example_ids = None, None
  elif example_ids is not None:
    example_ids = jnp.asarray(example_ids, jnp.int32)
  key = (model, method, max_len, tuple(sorted(options.items())), draft_model)
  try:
    fn = _COMPILED.get(key)
  except TypeError:  # an unhashable model: compile without caching
    key, fn = None, None
  if fn is None:
    fn = _build(model, method, max_len, options, draft_model)
    if key is not None:
      _COMPILED[key] = fn
  if method == "speculative":
    params = (params, draft_params)
  return fn(params, inputs, rng, example_ids)
