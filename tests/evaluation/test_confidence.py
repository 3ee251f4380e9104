"""Confidence scores: sequence scores equal the decoder's own log-probs, self-evaluation
probabilities equal teacher-forced scoring of each answer after the same prompt, prompts are
cut in the source text only."""

import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicjax import scoring
from slicjax.decoding import api as decoding_api
from slicjax.evaluation import confidence
from slicjax.models.factory import build_model

CHARS = string.ascii_letters + string.digits + " .,:?\n"
INPUT_LEN = 160


class CharTokenizer:
  """One id per character (ids from 3; 0 pad, 1 EOS)."""

  vocab_size = 3 + len(CHARS)

  def encode(self, text):
    return [3 + CHARS.index(ch) for ch in text if ch in CHARS]

  def decode(self, ids):
    out = []
    for i in ids:
      if int(i) == 1:
        break
      if int(i) >= 3:
        out.append(CHARS[int(i) - 3])
    return "".join(out)


TOK = CharTokenizer()


@pytest.fixture(scope="module")
def tiny():
  model = build_model(dict(preset="tiny", vocab_size=TOK.vocab_size, max_len=INPUT_LEN + 16))
  return model, model.init(jax.random.PRNGKey(3))


def _teacher_forced_logp(model, params, prompt_ids, answer):
  """log P(answer | prompt) by score_targets on one [1, S] + [1, La] pair."""
  x = np.zeros((1, INPUT_LEN), np.int32)
  x[0, : len(prompt_ids)] = prompt_ids
  y = np.asarray([TOK.encode(answer)], np.int32)
  out = scoring.score_targets(model, params, {"inputs": jnp.asarray(x), "targets": jnp.asarray(y)})
  return float(out["logp"][0])


def test_self_eval_equals_teacher_forced_yes_no(tiny):
  model, params = tiny
  scorer = confidence.ConfidenceScorer(model, TOK, INPUT_LEN)
  sources = ["def add a b return a plus b", "x" * 400]  # the second must be cut
  outputs = ["Add two numbers.", "Return x."]
  got = scorer.self_eval(params, sources, outputs)
  for src, out, p in zip(sources, outputs, got):
    ids = confidence.fit_prompt(TOK, lambda s, o=out: confidence.self_eval_text(s, o), src,
                                INPUT_LEN)
    yes, no = (_teacher_forced_logp(model, params, ids, a) for a in confidence.YES_NO)
    assert p == pytest.approx(np.exp(yes) / (np.exp(yes) + np.exp(no)), rel=1e-4)
    assert 0.0 < p < 1.0


def test_multi_choice_scores_the_judged_options_letter(tiny):
  model, params = tiny
  scorer = confidence.ConfidenceScorer(model, TOK, INPUT_LEN)
  opts = [["Add numbers.", "Sum.", "Plus a b."], ["Reverse.", "Flip it.", "Turn."]]
  got = scorer.multi_choice(params, ["def add a b", "def rev s"], opts, example_ids=[7, 8])
  for src, o, i, p in zip(["def add a b", "def rev s"], opts, [7, 8], got):
    perm = np.random.default_rng([0, i]).permutation(4)
    shown = [(o + [confidence.NONE_OF_THE_ABOVE])[j] for j in perm]
    ids = confidence.fit_prompt(TOK, lambda s: confidence.multi_choice_text(s, shown), src,
                                INPUT_LEN)
    lps = np.array([_teacher_forced_logp(model, params, ids, L) for L in "ABCD"])
    probs = np.exp(lps) / np.exp(lps).sum()
    judged = int(np.flatnonzero(perm == 0)[0])  # where option 0 was shown
    assert p == pytest.approx(probs[judged], rel=1e-4)
  # a different example id shuffles differently, so the same options can score differently
  other = scorer.multi_choice(params, ["def add a b"], opts[:1], example_ids=[9])
  assert np.isfinite(other).all()


def test_sequence_scores_equal_the_decoders_logp(tiny):
  model, params = tiny
  scorer = confidence.ConfidenceScorer(model, TOK, INPUT_LEN)
  x = np.zeros((2, INPUT_LEN), np.int32)
  x[0, :5], x[1, :9] = TOK.encode("hello"), TOK.encode("def f x y")
  res = decoding_api.decode(model, params, jnp.asarray(x), method="beam", max_len=8, beam_size=3)
  top = np.asarray(res.tokens_BxKxL)[:, 0]
  s = scorer.sequence_scores(params, x, top)
  np.testing.assert_allclose(s["logp"], np.asarray(res.logp_BxK)[:, 0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s["logp_norm"], s["logp"] / np.asarray(res.lengths_BxK)[:, 0],
                             rtol=1e-6)
  all_scores = confidence.score_outputs(
    scorer, params, confidence.SCORES, inputs_NxS=x, beams_NxKxL=np.asarray(res.tokens_BxKxL),
    sources=["hello", "def f x y"], detokenize=TOK.decode, batch_size=4,
  )
  assert set(all_scores) == set(confidence.SCORES)
  assert all(v.shape == (2,) and np.isfinite(v).all() for v in all_scores.values())
  np.testing.assert_allclose(all_scores["logp"], s["logp"], rtol=1e-6)


def test_prompts_cut_the_source_only_and_fail_clearly():
  ids = confidence.fit_prompt(TOK, lambda s: confidence.self_eval_text(s, "Out."), "y" * 500,
                              INPUT_LEN)
  assert len(ids) == INPUT_LEN
  assert TOK.decode(ids).endswith(confidence.SELF_EVAL_QUESTION)
  assert TOK.decode(ids).startswith("yyy")
  with pytest.raises(confidence.PromptTooLong, match="raise data.input_len"):
    confidence.fit_prompt(TOK, lambda s: confidence.self_eval_text(s, "Out."), "src", 20)
  with pytest.raises(ValueError, match="unknown score"):
    confidence.check_scores(["logp", "entropy"])
  with pytest.raises(ValueError, match="no tokenizer"):
    confidence.ConfidenceScorer(None, None, 8).self_eval(None, ["a"], ["b"])
