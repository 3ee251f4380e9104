"""Maps a pretrained model's token ids onto slicjax's special-id convention.

Everything in slicjax (padding masks, EOS handling in decoding, losses) reads the special ids
``PAD_ID = 0`` and ``EOS_ID = 1`` (``slicjax.models.seq_model``). A pretrained vocabulary puts its
specials elsewhere: SmolLM2 has ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2
(end of turn, its EOS), and pads with its EOS. Instead of threading a model's special ids through
every function, :class:`VocabMap` is a permutation of the vocabulary that swaps the model's pad
and EOS tokens into slots 0 and 1. It is applied once at the boundaries:

* parameters: the rows of the token embedding and the columns of an untied output head are
  permuted on import (:meth:`VocabMap.permute_params`) and restored on export
  (:meth:`VocabMap.unpermute_params`), so logits in slicjax ids equal the model's logits
  re-ordered by the same permutation, exactly;
* text: :class:`slicjax.interop.pretrained.PretrainedTokenizer` encodes into slicjax ids and
  decodes from them.

The model's pad token must differ from its EOS (slicjax would otherwise strip every EOS as
padding): when a checkpoint pads with EOS, its unknown token, then its BOS, then token 0 is used
for padding. Padded positions are masked everywhere, so which token fills them never matters.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from slicjax.models.seq_model import EOS_ID, PAD_ID


def choose_pad(eos_id: int, *, pad_id=None, unk_id=None, bos_id=None) -> int:
  """The model token that plays slicjax's PAD: the first of pad, unk, bos, 0 that is not EOS."""
  for cand in (pad_id, unk_id, bos_id, 0, 1):
    if cand is not None and cand != eos_id:
      return int(cand)
  raise ValueError("cannot choose a padding token distinct from EOS.")  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class VocabMap:
  """A vocabulary permutation: slicjax id ``i`` is model id ``to_model_ids[i]``.

  Attributes:
    to_model_ids: ``[V]`` int64, slicjax id -> model id.
    to_slicjax_ids: ``[V]`` int64, model id -> slicjax id (the inverse).
    model_pad_id, model_eos_id: the model tokens that sit at slicjax's PAD (0) and EOS (1).
  """

  to_model_ids: np.ndarray
  to_slicjax_ids: np.ndarray
  model_pad_id: int
  model_eos_id: int

  @classmethod
  def build(cls, vocab_size: int, *, model_pad_id: int, model_eos_id: int) -> VocabMap:
    """Swaps ``model_pad_id`` into slot 0 and ``model_eos_id`` into slot 1.

    Raises:
      ValueError: ids outside the vocabulary, or pad == eos.
    """
    for name, tid in (("pad", model_pad_id), ("eos", model_eos_id)):
      if not 0 <= tid < vocab_size:
        raise ValueError(
          f"the model's {name} id {tid} is outside its vocabulary of {vocab_size}; the tokenizer "
          "does not belong to these weights."
        )
    if model_pad_id == model_eos_id:
      raise ValueError(
        f"pad and eos are the same token ({model_pad_id}); choose another padding token "
        "(see vocab.choose_pad)."
      )
    perm = np.arange(vocab_size, dtype=np.int64)
    for slot, tid in ((PAD_ID, model_pad_id), (EOS_ID, model_eos_id)):
      j = int(np.nonzero(perm == tid)[0][0])
      perm[slot], perm[j] = perm[j], perm[slot]
    return cls(perm, np.argsort(perm), int(model_pad_id), int(model_eos_id))

  @property
  def vocab_size(self) -> int:
    return int(self.to_model_ids.shape[0])

  @property
  def is_identity(self) -> bool:
    return bool(np.all(self.to_model_ids == np.arange(self.vocab_size)))

  def to_model(self, ids) -> np.ndarray:
    return self.to_model_ids[np.asarray(ids, np.int64)]

  def to_slicjax(self, ids) -> np.ndarray:
    return self.to_slicjax_ids[np.asarray(ids, np.int64)]

  def _apply(self, params, index: np.ndarray):
    """Re-orders the vocabulary axis of the embedding (rows) and an untied head (columns)."""
    import jax.numpy as jnp

    out = dict(params)
    emb = params["token_embed"]["embedding"]
    if emb.shape[0] != self.vocab_size:
      raise ValueError(
        f"the embedding has {emb.shape[0]} rows but the tokenizer maps {self.vocab_size} ids; "
        "the tokenizer does not belong to these weights."
      )
    out["token_embed"] = {**params["token_embed"], "embedding": jnp.take(emb, index, axis=0)}
    if "head" in params and "lm_head" in params["head"]:
      kernel = params["head"]["lm_head"]["kernel"]
      out["head"] = {
        **params["head"],
        "lm_head": {**params["head"]["lm_head"], "kernel": jnp.take(kernel, index, axis=1)},
      }
    return out

  def permute_params(self, params):
    """Model-id params -> slicjax-id params (embedding row ``i`` := model row ``perm[i]``)."""
    return params if self.is_identity else self._apply(params, self.to_model_ids)

  def unpermute_params(self, params):
    """slicjax-id params -> the model's own id order (for export)."""
    return params if self.is_identity else self._apply(params, self.to_slicjax_ids)

  def to_json(self) -> dict:
    """The map's defining ids (the permutation is two swaps, rebuilt by :meth:`build`)."""
    return dict(
      vocab_size=self.vocab_size, model_pad_id=self.model_pad_id, model_eos_id=self.model_eos_id
    )
