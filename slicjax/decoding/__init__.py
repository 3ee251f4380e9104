"""Autoregressive decoding over a ``tokens_to_logits(tokens_B, cache) -> (logits_BxV, cache)`` step.

Greedy search, sampling (temperature / top-k / top-p), beam search and diverse beam search, all
batched ``lax.while_loop`` programs that never import a model; :func:`decode` runs any of them on
a model adapter's ``decode_state``. Speculative decoding (:func:`speculative_decode`, or
``decode(..., method="speculative", draft=(draft_model, draft_params))``) works on two model
adapters: a draft proposes, a decoder-only transformer target verifies (greedy or exact sampling).

``slicjax.decoding.beam_search`` is the module; its function is
``slicjax.decoding.beam_search.beam_search`` (not re-exported here, so the module name keeps
pointing at the module).
"""

from slicjax.decoding import api, beam_search, sampling, speculative, types
from slicjax.decoding.api import METHODS, OPTIONS, decode
from slicjax.decoding.beam_search import diverse_beam_search, length_penalty
from slicjax.decoding.sampling import (
  greedy_search,
  no_repeat_ngram_mask,
  sample,
  top_k_mask,
  top_p_mask,
)
from slicjax.decoding.speculative import speculative_decode
from slicjax.decoding.types import BeamState, DecodeResult, SamplingState, SpeculativeStats

__all__ = [
  "METHODS",
  "OPTIONS",
  "BeamState",
  "DecodeResult",
  "SamplingState",
  "SpeculativeStats",
  "api",
  "beam_search",
  "decode",
  "diverse_beam_search",
  "greedy_search",
  "length_penalty",
  "no_repeat_ngram_mask",
  "sample",
  "sampling",
  "speculative",
  "speculative_decode",
  "top_k_mask",
  "top_p_mask",
  "types",
]
