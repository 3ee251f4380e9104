"""Latent / token-embedding span F-measure and ROUGE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rouge_score import rouge_scorer

from slicjax import similarity


def _reference_score(cand, ref, sizes):
  """Independent numpy version: explicit lists of spans over the valid tokens."""

  def spans(h, n):
    return [h[i : i + n].mean(0) for i in range(len(h) - n + 1)]

  def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

  fs = []
  for n in sizes:
    if n > len(cand) or n > len(ref):
      continue
    cs, rs = spans(cand, n), spans(ref, n)
    p = np.mean([max(cos(a, b) for b in rs) for a in cs])
    r = np.mean([max(cos(a, b) for a in cs) for b in rs])
    fs.append(2 * p * r / (p + r))
  return len(sizes) * np.mean(fs) if fs else 0.0


def _random_case(seed, b=2, k=3, lc=11, lr=9, d=5):
  rng = np.random.default_rng(seed)
  ch = rng.normal(size=(b, k, lc, d)).astype(np.float32)
  rh = rng.normal(size=(b, lr, d)).astype(np.float32)
  cm = rng.random((b, k, lc)) > 0.25  # holes in the middle too
  rm = rng.random((b, lr)) > 0.25
  cm[0, 0] = False
  cm[0, 0, [2, 5, 6]] = True  # a 3-token candidate: sizes 4 and 8 are dropped
  return ch, cm, rh, rm


def test_hand_example_and_drop_renormalize():
  e = np.eye(2, dtype=np.float32)
  cand = jnp.asarray(e[None, None])  # candidate tokens e1, e2
  ref = jnp.asarray(e[None, :1])  # target token e1
  cm, rm = jnp.ones((1, 1, 2)), jnp.ones((1, 1))
  # n=1: P = mean(cos(e1,e1), cos(e2,e1)) = 0.5, R = 1, F = 2*0.5/1.5 = 2/3.
  got = similarity.latent_similarity(cand, cm, ref, rm, span_sizes=(1,))
  np.testing.assert_allclose(got, [[2 / 3]], rtol=1e-6)
  # n=2 does not fit the 1-token target: dropped, sum renormalized to 2 sizes: 2 * 2/3.
  got = similarity.latent_similarity(cand, cm, ref, rm, span_sizes=(1, 2))
  np.testing.assert_allclose(got, [[4 / 3]], rtol=1e-6)


def test_matches_independent_implementation():
  ch, cm, rh, rm = _random_case(0)
  got = np.asarray(similarity.latent_similarity(ch, cm, rh, rm))
  for b in range(ch.shape[0]):
    for k in range(ch.shape[1]):
      want = _reference_score(ch[b, k][cm[b, k]], rh[b][rm[b]], (1, 2, 4, 8))
      np.testing.assert_allclose(got[b, k], want, rtol=1e-4, atol=1e-5)
  # The 3-token candidate used sizes 1 and 2 only: 4/2 * (F1 + F2).
  c, r = ch[0, 0][cm[0, 0]], rh[0][rm[0]]
  f1_plus_f2 = _reference_score(c, r, (1, 2))
  np.testing.assert_allclose(got[0, 0], 4 / 2 * f1_plus_f2, rtol=1e-4)


def test_identical_sequences_score_number_of_sizes():
  ch, cm, rh, rm = _random_case(1, b=1, k=2)
  # Candidate 1 is the target, laid out with different padding positions.
  valid = rh[0][rm[0]]
  n = len(valid)
  cm[0, 1] = False
  pos = np.sort(np.random.default_rng(5).choice(ch.shape[2], n, replace=False))
  cm[0, 1, pos] = True
  ch[0, 1, pos] = valid
  got = similarity.latent_similarity(ch, cm, rh, rm)
  np.testing.assert_allclose(got[0, 1], 4.0, rtol=1e-5)
  assert float(got[0, 0]) < 3.5
  got3 = similarity.latent_similarity(ch, cm, rh, rm, span_sizes=(1, 3, 5))
  np.testing.assert_allclose(got3[0, 1], 3.0, rtol=1e-5)


def test_symmetric_under_swap():
  ch, cm, rh, rm = _random_case(2, k=1, lc=9, lr=9)
  fwd = similarity.latent_similarity(ch, cm, rh, rm)
  bwd = similarity.latent_similarity(rh[:, None], rm[:, None], ch[:, 0], cm[:, 0])
  np.testing.assert_allclose(fwd, bwd, rtol=1e-5)
  # P != R here (different lengths), so symmetry is not trivial.
  assert cm[0, 0].sum() != rm[0].sum()


def test_masked_tokens_do_not_matter():
  ch, cm, rh, rm = _random_case(3)
  base = similarity.latent_similarity(ch, cm, rh, rm)
  rng = np.random.default_rng(9)
  ch2 = np.where(cm[..., None], ch, rng.normal(size=ch.shape) * 100).astype(np.float32)
  rh2 = np.where(rm[..., None], rh, rng.normal(size=rh.shape) * 100).astype(np.float32)
  np.testing.assert_allclose(similarity.latent_similarity(ch2, cm, rh2, rm), base, rtol=1e-5)
  # Longer padding at the end changes nothing either.
  ch3 = np.pad(ch, ((0, 0), (0, 0), (0, 4), (0, 0)))
  cm3 = np.pad(cm, ((0, 0), (0, 0), (0, 4)))
  np.testing.assert_allclose(similarity.latent_similarity(ch3, cm3, rh, rm), base, rtol=1e-5)
  # An empty candidate scores 0; the function jit-compiles.
  cm4 = cm.copy()
  cm4[1, 2] = False
  got = jax.jit(similarity.latent_similarity)(ch, cm4, rh, rm)
  assert float(got[1, 2]) == 0.0


def test_token_embedding_similarity():
  emb = jnp.asarray(np.random.default_rng(0).normal(size=(10, 4)), jnp.float32)
  ids = jnp.array([[[4, 5, 6, 0], [4, 7, 0, 0]]])
  ref = jnp.array([[4, 5, 6]])
  cm = ids != 0
  rm = ref != 0
  got = similarity.token_embedding_similarity(ids, cm, ref, rm, emb)
  np.testing.assert_allclose(got[0, 0], 4.0, rtol=1e-5)  # identical tokens
  want = _reference_score(np.asarray(emb)[[4, 7]], np.asarray(emb)[[4, 5, 6]], (1, 2, 4, 8))
  np.testing.assert_allclose(got[0, 1], want, rtol=1e-4)
  with pytest.raises(ValueError, match="outside"):
    similarity.token_embedding_similarity(ids + 8, cm, ref, rm, emb)


def test_latent_similarity_errors():
  ch, cm, rh, rm = _random_case(4)
  with pytest.raises(ValueError, match="span_sizes"):
    similarity.latent_similarity(ch, cm, rh, rm, span_sizes=(0, 2))
  with pytest.raises(ValueError, match="masks"):
    similarity.latent_similarity(ch, cm[..., :3], rh, rm)
  with pytest.raises(ValueError, match="model dims"):
    similarity.latent_similarity(ch, cm, rh[..., :2], rm)


CANDS = [
  "the cat sat on the mat",
  "a quick brown fox jumps",
  "running runners ran quickly",
  "",
]
REFS = ["the cat is on the mat", "the quick brown dog jumped", "a runner runs quick", "nothing"]


def _direct(cands, refs, types, stem=True):
  scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=stem)
  return {t: np.array([scorer.score(r, c)[t].fmeasure for c, r in zip(cands, refs)]) for t in types}


def test_rouge_matches_rouge_score_directly():
  types = ("rouge1", "rouge2", "rougeL")
  got = similarity.rouge_scores(CANDS, REFS)
  want = _direct(CANDS, REFS, types)
  for t in types:
    np.testing.assert_allclose(got[t], want[t], rtol=1e-12)
  assert got["rouge1"][0] > 0.5 and got["rouge1"][3] == 0.0
  # Stemming is honored ("runners" ~ "runner" only with the stemmer).
  nostem = similarity.rouge_scores(CANDS, REFS, use_stemmer=False)
  assert nostem["rouge1"][2] != got["rouge1"][2]


def test_rouge_nested_and_parallel():
  nested = [[CANDS[0], CANDS[1]], [CANDS[2], CANDS[3]]]
  refs = REFS[:2]
  got = similarity.rouge_scores(nested, refs, types=("rouge1", "rougeLsum"), num_workers=2)
  flat_c = [c for row in nested for c in row]
  flat_r = [r for r in refs for _ in range(2)]
  want = _direct(flat_c, flat_r, ("rouge1", "rougeLsum"))
  for t in ("rouge1", "rougeLsum"):
    assert got[t].shape == (2, 2)
    np.testing.assert_allclose(got[t].reshape(-1), want[t], rtol=1e-12)


def test_rouge_errors():
  with pytest.raises(ValueError, match="references"):
    similarity.rouge_scores(CANDS, REFS[:2])
  with pytest.raises(ValueError, match="same length"):
    similarity.rouge_scores([["a"], ["b", "c"]], ["a", "b"])
  with pytest.raises(ValueError):
    similarity.rouge_scores(CANDS, REFS, types=("rougeX",))


@pytest.mark.parametrize("position", ["learned", "relative"])
def test_embedding_table_is_the_token_table_not_a_position_table(position):
  import jax

  from slicjax.models.factory import build_model
  from slicjax.pipelines import candidates

  model = build_model(dict(preset="tiny", vocab_size=40, max_len=24, position=position))
  params = model.init(jax.random.PRNGKey(0), input_len=4, target_len=4)
  table = candidates.embedding_table(params)
  assert table.shape == (40, 64)
  np.testing.assert_array_equal(table, params["token_embed"]["embedding"])
  lora = candidates.embedding_table({"base": params, "lora": {}})
  np.testing.assert_array_equal(lora, table)
