"""Confidence scores for decoded outputs, all computed by the one scoring primitive
(:func:`slicjax.scoring.score_candidates`), for any model family that can score text:

* ``logp`` — the output's sequence log-likelihood (EOS included);
* ``logp_norm`` — the same divided by its length in tokens;
* ``self_eval`` — point-wise self-evaluation: the model reads the input and the output and is
  asked whether the output is a correct summary; the score is
  ``P("Yes") / (P("Yes") + P("No"))`` of the teacher-forced answers;
* ``multi_choice`` — multi-way self-evaluation: the model reads the input and its K beam
  candidates as lettered options plus "None of the above" (in a per-example shuffled order) and
  is asked which is best; the score is the probability of the letter of the output being judged
  (the top beam), normalized over all option letters.

The self-evaluation prompts are built from text, so they need a task with a tokenizer; the
source text is cut (never the question or the options) to fit ``input_len``.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from slicjax import scoring
from slicjax.models.seq_model import PAD_ID

SCORES = ("logp", "logp_norm", "self_eval", "multi_choice")
TEXT_SCORES = ("self_eval", "multi_choice")

SELF_EVAL_QUESTION = "Is the proposed summary correct? Answer Yes or No."
MULTI_CHOICE_QUESTION = "Which option is the best summary? Answer with its letter."
NONE_OF_THE_ABOVE = "None of the above"
YES_NO = ("Yes", "No")


class PromptTooLong(ValueError):
  """A self-evaluation prompt cannot fit ``input_len`` even without the input text."""


def check_scores(names: Sequence[str]) -> tuple[str, ...]:
  names = tuple(names)
  unknown = [n for n in names if n not in SCORES]
  if unknown or not names:
    raise ValueError(
      f"evaluate.selective_scores={names!r}: unknown score {unknown}; choose from {SCORES}."
    )
  return names


# --- prompts ----------------------------------------------------------------------------------
def self_eval_text(source: str, output: str) -> str:
  """The point-wise question about one output."""
  return f"{source}\n\nProposed summary: {output}\n\n{SELF_EVAL_QUESTION}"


def multi_choice_text(source: str, options: Sequence[str]) -> str:
  """The multi-way question over lettered options (the last one should be "None of the
  above")."""
  lines = [f"{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options)]
  return f"{source}\n\nOptions:\n" + "\n".join(lines) + f"\n\n{MULTI_CHOICE_QUESTION}"


def _encoder(tokenizer) -> Callable[[str], list[int]]:
  # A pretrained tokenizer wraps the question in the model's prompt format, without the task's
  # own instruction (the question replaces it).
  if hasattr(tokenizer, "with_instruction"):
    return tokenizer.with_instruction("").encode_prompt
  return tokenizer.encode


def fit_prompt(tokenizer, build: Callable[[str], str], source: str, max_tokens: int) -> list[int]:
  """Token ids of ``build(source)``, cutting ``source`` from the end until they fit
  ``max_tokens``.

  Raises:
    ValueError: the prompt without any source text is already longer than ``max_tokens``.
  """
  enc = _encoder(tokenizer)
  ids = enc(build(source))
  if len(ids) <= max_tokens:
    return ids
  room = max_tokens - len(enc(build("")))
  src_ids = tokenizer.encode(source)
  for _ in range(8):
    if room < 1:
      break
    ids = enc(build(tokenizer.decode(src_ids[:room])))
    if len(ids) <= max_tokens:
      return ids
    room -= len(ids) - max_tokens
  raise PromptTooLong(
    f"the self-evaluation prompt needs {len(enc(build('')))} tokens without the input text, "
    f"more than data.input_len={max_tokens}; raise data.input_len or leave the self-evaluation "
    "scores out of evaluate.selective_scores."
  )


def _pad_rows(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
  out = np.full((len(rows), width), PAD_ID, np.int32)
  for i, r in enumerate(rows):
    out[i, : len(r)] = r
  return out


def answer_tokens(tokenizer, answers: Sequence[str]) -> np.ndarray:
  """``[A, La]`` int32: each answer's tokens (no EOS), right-padded.

  Raises:
    ValueError: an answer encodes to no tokens.
  """
  rows = [tokenizer.encode(a) for a in answers]
  empty = [a for a, r in zip(answers, rows) if not r]
  if empty:
    raise ValueError(f"answers {empty} encode to no tokens with this tokenizer.")
  return _pad_rows(rows, max(len(r) for r in rows))


# --- scoring ----------------------------------------------------------------------------------
class ConfidenceScorer:
  """Scores outputs of one model; programs are compiled once per shape and reused.

  Args:
    model: a :class:`~slicjax.models.seq_model.SeqModel` (or diffusion model).
    tokenizer: the task's tokenizer (``None`` for token-id tasks: only ``logp`` and
      ``logp_norm`` are then available).
    input_len: the prompt width the model was trained with (self-evaluation prompts are cut to
      it).
  """

  def __init__(self, model, tokenizer, input_len: int):
    self.model, self.tokenizer, self.input_len = model, tokenizer, int(input_len)
    self._score = jax.jit(
      lambda p, x, y: scoring.score_candidates(model, p, x, y)
    )

  def _logp(self, params, inputs_BxS, cands_BxKxL):
    out = self._score(params, jnp.asarray(inputs_BxS), jnp.asarray(cands_BxKxL))
    return np.asarray(out["logp"], np.float64), np.asarray(out["mask"]).sum(-1)

  def sequence_scores(self, params, inputs_BxS, outputs_BxL) -> dict[str, np.ndarray]:
    """``logp`` and ``logp_norm`` ``[B]`` of outputs (tokens with EOS, PAD after it)."""
    lp, n = self._logp(params, inputs_BxS, np.asarray(outputs_BxL)[:, None, :])
    return dict(logp=lp[:, 0], logp_norm=lp[:, 0] / np.maximum(n[:, 0], 1))

  def option_probs(self, params, prompts: Sequence[Sequence[int]], answers_AxL) -> np.ndarray:
    """``[B, A]``: softmax over the answers' sequence log-likelihoods after each prompt."""
    x = _pad_rows(prompts, self.input_len)
    a = np.asarray(answers_AxL)
    cands = np.broadcast_to(a[None], (len(prompts),) + a.shape)
    lp, _ = self._logp(params, x, cands)
    lp = lp - lp.max(-1, keepdims=True)
    p = np.exp(lp)
    return p / p.sum(-1, keepdims=True)

  def self_eval(self, params, sources: Sequence[str], outputs: Sequence[str]) -> np.ndarray:
    """``[B]``: ``P(Yes) / (P(Yes) + P(No))`` for each (source, output)."""
    self._need_tokenizer("self_eval")
    prompts = [
      fit_prompt(self.tokenizer, lambda s, o=o: self_eval_text(s, o), src, self.input_len)
      for src, o in zip(sources, outputs)
    ]
    return self.option_probs(params, prompts, answer_tokens(self.tokenizer, YES_NO))[:, 0]

  def multi_choice(self, params, sources: Sequence[str], options_BxK: Sequence[Sequence[str]],
                   example_ids: Sequence[int], seed: int = 0) -> np.ndarray:
    """``[B]``: probability of the letter of option 0 (the output judged) among the K options
    plus "None of the above", shown in an order shuffled per example id."""
    self._need_tokenizer("multi_choice")
    k = len(options_BxK[0])
    if any(len(o) != k for o in options_BxK):
      raise ValueError("multi_choice: every example needs the same number of options.")
    if k + 1 > len(string.ascii_uppercase):
      raise ValueError(f"multi_choice: {k} options; at most 25 fit the letters A-Z with NOTA.")
    letters = answer_tokens(self.tokenizer, string.ascii_uppercase[: k + 1])
    prompts, where = [], []
    for src, opts, i in zip(sources, options_BxK, example_ids):
      perm = np.random.default_rng([seed, int(i)]).permutation(k + 1)  # slot j shows perm[j]
      shown = [(list(opts) + [NONE_OF_THE_ABOVE])[j] for j in perm]
      prompts.append(fit_prompt(self.tokenizer, lambda s, shown=shown: multi_choice_text(s, shown),
                                src, self.input_len))
      where.append(int(np.flatnonzero(perm == 0)[0]))
    probs = self.option_probs(params, prompts, letters)
    return probs[np.arange(len(where)), where]

  def _need_tokenizer(self, name):
    if self.tokenizer is None:
      raise ValueError(
        f"the {name!r} confidence score builds a text prompt, but this task has no tokenizer "
        "(token-id task); use 'logp' or 'logp_norm'."
      )


def score_outputs(
  scorer: ConfidenceScorer, params, names: Sequence[str], *, inputs_NxS, beams_NxKxL,
  sources: Sequence[str] | None, detokenize: Callable[[Any], str], batch_size: int,
  example_ids: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
  """Every requested confidence score ``[N]`` of the top beam ``beams_NxKxL[:, 0]``, in batches
  of ``batch_size`` (the last one padded, its padding dropped)."""
  names = check_scores(names)
  n = len(inputs_NxS)
  ids = list(range(n)) if example_ids is None else list(example_ids)
  out: dict[str, list[np.ndarray]] = {s: [] for s in names}
  for lo in range(0, n, batch_size):
    hi = min(lo + batch_size, n)
    sel = list(range(lo, hi)) + [hi - 1] * (batch_size - (hi - lo))
    x, beams = np.asarray(inputs_NxS)[sel], np.asarray(beams_NxKxL)[sel]
    m = hi - lo
    if "logp" in names or "logp_norm" in names:
      seq = scorer.sequence_scores(params, x, beams[:, 0])
      for s in ("logp", "logp_norm"):
        if s in names:
          out[s].append(seq[s][:m])
    if "self_eval" in names or "multi_choice" in names:
      srcs = [sources[i] for i in sel]
      texts = [[detokenize(y) for y in row] for row in beams]
      if "self_eval" in names:
        out["self_eval"].append(scorer.self_eval(params, srcs, [t[0] for t in texts])[:m])
      if "multi_choice" in names:
        out["multi_choice"].append(
          scorer.multi_choice(params, srcs, texts, [ids[i] for i in sel])[:m]
        )
  return {s: np.concatenate(v) for s, v in out.items()}
