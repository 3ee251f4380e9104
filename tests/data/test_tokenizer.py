"""Tokenizer: special ids, exact round trips, EOS/pad handling, content-hash cache, timing."""

import io
import os

import numpy as np
import pytest
import sentencepiece as spm

from slicjax.data import tokenizer as tk
from slicjax.data.builders import stdlib_docstrings as sd

CORPUS = [
  "def add(x, y):\n    return x + y",
  "Return the sum of two numbers.",
  "class Point:\n\tdef norm(self):\n\t\treturn (self.x ** 2 + self.y ** 2) ** 0.5",
  "Compute the Euclidean norm of the point.",
  "for i in range(10):\n    print(i)  # loop",
  "Grüße aus Köln, naïve café.",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tk.train_tokenizer(CORPUS, vocab_size=320, cache_dir=str(tmp_path_factory.mktemp("c")))


def test_special_ids(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert [tok.id_to_piece(i) for i in range(6)] == ["<pad>", "</s>", "<s>", "<unk>", "\n", "\t"]
  assert 300 <= tok.vocab_size <= 320


@pytest.mark.parametrize(
  "text",
  ["def add(x, y):\n    return x + y", "  two  spaces\tand tab\n\n", "日本語 🚀 unseen ẞ", ""],
)
def test_exact_round_trip_including_unseen_characters(tok, text):
  ids = tok.encode(text)
  assert all(isinstance(i, int) for i in ids)
  assert tk.UNK_ID not in ids  # byte fallback instead of <unk>
  assert tok.decode(ids) == text


def test_decode_stops_at_eos_and_drops_pad(tok):
  a, b = "return x + y", "print(i)"
  ids = tok.encode(a)
  assert tok.decode([0, 0] + ids + [1] + tok.encode(b) + [0]) == a
  assert tok.decode(np.array([2] + ids + [1, 0, 0], np.int32)) == a
  assert tok.decode([1] + ids) == ""
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size + 5])
  with pytest.raises(TypeError, match="decode bytes first"):
    tok.encode(b"bytes")


def test_cache_reuses_model_and_changes_with_content(tmp_path, monkeypatch):
  cache = str(tmp_path / "cache")
  t1 = tk.train_tokenizer(CORPUS, vocab_size=320, cache_dir=cache)
  calls = []
  real_train = spm.SentencePieceTrainer.Train
  monkeypatch.setattr(
    spm.SentencePieceTrainer, "Train", lambda **kw: calls.append(1) or real_train(**kw)
  )
  t2 = tk.train_tokenizer(list(CORPUS), vocab_size=320, cache_dir=cache)
  assert t2.model_path == t1.model_path and calls == []
  t3 = tk.train_tokenizer(CORPUS + ["one more text"], vocab_size=320, cache_dir=cache)
  t4 = tk.train_tokenizer(CORPUS, vocab_size=330, cache_dir=cache)
  assert len(calls) == 2 and len({t1.model_path, t3.model_path, t4.model_path}) == 3
  assert sorted(os.listdir(cache)) == sorted(os.path.basename(t.model_path) for t in (t1, t3, t4))


def test_load_checks_special_ids_and_path(tmp_path, tok):
  assert tk.load_tokenizer(tok.model_path).encode("x + y") == tok.encode("x + y")
  proto = io.BytesIO()
  spm.SentencePieceTrainer.Train(  # SentencePiece defaults: unk=0, bos=1, eos=2, no pad
    sentence_iterator=iter(CORPUS), model_writer=proto, vocab_size=120, minloglevel=2,
    hard_vocab_limit=False,
  )  # fmt: skip
  path = tmp_path / "other.model"
  path.write_bytes(proto.getvalue())
  with pytest.raises(ValueError, match=r"special ids .* = \(-1, 2, 1, 0\).*retrain"):
    tk.load_tokenizer(str(path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tk.load_tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="no non-empty texts"):
    tk.train_tokenizer(["", ""], cache_dir=str(tmp_path))


def test_train_on_embedded_dataset(tmp_path):
  # Its speed is a benchmark concern (BENCHMARKS.md: demo stage "dataset + tokenizer").
  splits, _ = sd.extract_stdlib()
  tok = tk.train_on_records(splits["train"], vocab_size=2000, cache_dir=str(tmp_path))
  assert tok.vocab_size == 2000
  val = splits["validation"][:50]
  assert all(tok.decode(tok.encode(r["input"])) == r["input"] for r in val)
  # A real subword model: far fewer tokens than characters on held-out code.
  n_chars = sum(len(r["input"]) for r in val)
  n_tokens = sum(len(tok.encode(r["input"])) for r in val)
  assert n_tokens < n_chars / 2.5, (n_tokens, n_chars)
