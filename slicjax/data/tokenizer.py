"""SentencePiece tokenizers: train on a dataset's training split (cached) or load a ``.model``.

Special ids, fixed for every model this module trains or accepts:

=====  ====  ===================================================================
id     name  meaning
=====  ====  ===================================================================
0      pad   padding; :meth:`Tokenizer.decode` drops it
1      eos   end of sequence; targets end with it; ``decode`` stops at the first
2      bos   beginning of targets in the prefix-LM layout ``inputs + [BOS] + targets``
3      unk   unknown piece (rare: trained models fall back to UTF-8 bytes)
=====  ====  ===================================================================

Trained models keep text exactly: no Unicode normalisation, whitespace runs preserved, ``"\\n"``
and ``"\\t"`` are pieces of their own, and characters outside the vocabulary become UTF-8 byte
pieces. So ``decode(encode(s)) == s`` for any string (source code included).

Training is cached by content: the model file is ``<cache_dir>/spm_<hash>.model`` where the
hash covers the training texts and every option, so the same data and options reuse the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from absl import logging

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
CACHE_DIR_ENV = "SLICJAX_CACHE_DIR"


def default_cache_dir() -> str:
  """``$SLICJAX_CACHE_DIR/tokenizers`` or ``~/.cache/slicjax/tokenizers``."""
  root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "slicjax")
  return os.path.join(root, "tokenizers")


class Tokenizer:
  """A SentencePiece model with the special ids above.

  Args:
    model_path: a ``.model`` file.
    model_proto: the serialized model instead of a path.
  """

  pad_id, eos_id, bos_id, unk_id = PAD_ID, EOS_ID, BOS_ID, UNK_ID

  def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
    if (model_path is None) == (model_proto is None):
      raise ValueError("pass exactly one of model_path or model_proto.")
    if model_path is not None and not os.path.isfile(model_path):
      raise FileNotFoundError(
        f"tokenizer model {model_path!r} does not exist; pass an existing SentencePiece .model "
        "file or train one with train_tokenizer(...)."
      )
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor()
    if model_path is not None:
      self._sp.Load(model_path)
    else:
      self._sp.LoadFromSerializedProto(model_proto)
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id(), self._sp.unk_id())
    if got != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
      raise ValueError(
        f"tokenizer {model_path or '<proto>'} has special ids (pad, eos, bos, unk) = {got}, but "
        f"slicjax needs {(PAD_ID, EOS_ID, BOS_ID, UNK_ID)}; retrain it with pad_id=0, eos_id=1, "
        "bos_id=2, unk_id=3 (train_tokenizer does)."
      )

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no BOS or EOS added)."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}; decode bytes first.")
    return list(self._sp.EncodeAsIds(text))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids``, stopping at the first EOS and dropping padding (and BOS)."""
    out = []
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if i == EOS_ID:
        break
      if i in (PAD_ID, BOS_ID):
        continue
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}).")
      out.append(i)
    return self._sp.DecodeIds(out)

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def __repr__(self) -> str:
    return f"Tokenizer({self.model_path or '<proto>'}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer:
  """Loads an existing SentencePiece ``.model`` (its special ids must match the table above)."""
  return Tokenizer(path)


def _select(texts: list[str], max_texts: int | None, seed: int) -> list[str]:
  if max_texts is None or len(texts) <= max_texts:
    return texts
  keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=max_texts, replace=False))
  return [texts[i] for i in keep]


def train_tokenizer(
  texts: Iterable[str],
  *,
  vocab_size: int = 2000,
  cache_dir: str | None = None,
  model_type: str = "unigram",
  character_coverage: float = 0.9995,
  max_texts: int | None = 20_000,
  max_text_bytes: int = 8192,
  seed: int = 0,
  num_threads: int = 2,
) -> Tokenizer:
  """Trains (or reuses a cached) SentencePiece model on ``texts``.

  Args:
    texts: training texts (e.g. the inputs and targets of a training split).
    vocab_size: pieces in the model, the 4 special ids and 256 byte pieces included.
    cache_dir: where models are cached (default :func:`default_cache_dir`).
    model_type: ``unigram`` or ``bpe``.
    character_coverage: fraction of characters covered by single-character pieces.
    max_texts: train on at most this many texts (a seeded sample, in the original order);
      ``None`` uses all. This caps training time.
    max_text_bytes: longer texts are cut to this many UTF-8 bytes for training only.
    seed: sampling seed.
    num_threads: SentencePiece trainer threads.
  """
  all_texts = [t for t in texts if t]
  if not all_texts:
    raise ValueError("no non-empty texts to train a tokenizer on; check the training split.")
  if vocab_size < 300:
    raise ValueError(f"vocab_size must be >= 300 (4 special + 256 byte pieces + some), got "
                     f"{vocab_size}.")  # fmt: skip
  chosen = _select(all_texts, max_texts, seed)
  chosen = [t.encode("utf-8")[:max_text_bytes].decode("utf-8", "ignore") for t in chosen]
  options = dict(
    vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
    pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    user_defined_symbols=["\n", "\t"], allow_whitespace_only_pieces=True, byte_fallback=True,
    split_digits=True, max_sentence_length=max_text_bytes + 16, input_sentence_size=0,
    shuffle_input_sentence=False, hard_vocab_limit=False,
  )  # fmt: skip
  h = hashlib.sha256(json.dumps(options, sort_keys=True).encode("utf-8"))
  for t in chosen:
    b = t.encode("utf-8")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, f"spm_{h.hexdigest()[:16]}.model")
  if os.path.isfile(path):
    logging.info("Reusing cached tokenizer %s.", path)
    return Tokenizer(path)
  os.makedirs(cache_dir, exist_ok=True)
  proto = io.BytesIO()
  logging.info("Training a %d-piece tokenizer on %d texts -> %s.", vocab_size, len(chosen), path)
  spm.SentencePieceTrainer.Train(
    sentence_iterator=iter(chosen), model_writer=proto, num_threads=num_threads, minloglevel=2,
    **options,
  )  # fmt: skip
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(proto.getvalue())
  os.replace(tmp, path)
  return Tokenizer(path)


def train_on_records(
  records,
  *,
  fields: Sequence[str] = ("input", "target"),
  max_texts: int | None = 20_000,
  seed: int = 0,
  **kwargs,
) -> Tokenizer:
  """Trains on the text ``fields`` of each record (e.g. a training split's source).

  A random-access source (``len`` and indexing) with more than ``max_texts`` texts is
  subsampled by record (seeded) before reading, so large splits are not read in full.

  Args:
    records: an iterable or random-access source of dicts whose ``fields`` are str or bytes.
    fields: which record fields are training text.
    max_texts: cap on training texts (see :func:`train_tokenizer`).
    seed: sampling seed.
    **kwargs: passed to :func:`train_tokenizer`.
  """
  rows = records
  if max_texts is not None and hasattr(records, "__len__") and hasattr(records, "__getitem__"):
    n, per = len(records), max(1, max_texts // len(fields))
    if n > per:
      keep = np.sort(np.random.default_rng(seed).choice(n, size=per, replace=False))
      rows = (records[int(i)] for i in keep)
  texts = []
  for r in rows:
    for f in fields:
      v = r[f]
      texts.append(v.decode("utf-8") if isinstance(v, bytes) else v)
  return train_tokenizer(texts, max_texts=max_texts, seed=seed, **kwargs)
