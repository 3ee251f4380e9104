"""TFDS catalog summarization sets, read TF-free and mapped to ``{"input", "target"}``.

=============  ==========================  ============  ============  =====================
name           TFDS builder                input key     target key    notes
=============  ==========================  ============  ============  =====================
xsum           ``xsum``                    document      summary
cnn_dailymail  ``cnn_dailymail``           article       highlights
samsum         ``samsum``                  dialogue      summary       needs ``manual_dir``
reddit_tifu    ``reddit_tifu/long_split``  documents     tldr          PEGASUS 80/10/10 split
=============  ==========================  ============  ============  =====================

Reading goes through ``builder.as_data_source`` (array_record, random access, no
TensorFlow). Preparing these sets is different: their TFDS generation code uses TensorFlow
(``tf.io.gfile``) and the network, so prepare them once where both are available::

  tfds build xsum --file_format=array_record --data_dir=DATA_DIR
  tfds build samsum --file_format=array_record --manual_dir=DIR_WITH_train.json_val.json_test.json

then point ``data_dir`` here at ``DATA_DIR``. ``download=True`` asks TFDS to prepare on this
machine (it fails without TensorFlow or network access, with the reason).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import grain
import tensorflow_datasets as tfds

from slicjax.data.builders import base


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
  """How one catalog dataset maps to ``{"input", "target"}``."""

  tfds_name: str
  module: str  # the tensorflow_datasets module that registers the builder
  input_key: str
  target_key: str
  needs_manual_dir: bool = False


CATALOG: dict[str, CatalogEntry] = {
  "xsum": CatalogEntry("xsum", "summarization.xsum", "document", "summary"),
  "cnn_dailymail": CatalogEntry(
    "cnn_dailymail", "summarization.cnn_dailymail", "article", "highlights"
  ),
  "samsum": CatalogEntry(
    "samsum", "summarization.samsum", "dialogue", "summary", needs_manual_dir=True
  ),
  "reddit_tifu": CatalogEntry(
    "reddit_tifu/long_split", "summarization.reddit_tifu", "documents", "tldr"
  ),
}


class CatalogNotPreparedError(RuntimeError):
  """A catalog dataset has no array_record data in the given ``data_dir``."""


def entry(name: str) -> CatalogEntry:
  """The :class:`CatalogEntry` for ``name`` (``tfds:`` prefix allowed)."""
  key = name.removeprefix("tfds:")
  if key not in CATALOG:
    raise ValueError(
      f"unknown catalog dataset {name!r}; choose one of {sorted(CATALOG)}, or use a local "
      "jsonl file (jsonl_seq2seq)."
    )
  return CATALOG[key]


def to_seq2seq(name: str, example: dict[str, Any]) -> dict[str, str]:
  """Maps one catalog example to ``{"input", "target"}`` (decoding bytes to str)."""
  e = entry(name)
  for key in (e.input_key, e.target_key):
    if key not in example:
      raise KeyError(
        f"{name} example has no {key!r} field (fields: {sorted(example)}); the catalog "
        "version on disk differs from the one this mapping expects."
      )
  return {
    "input": base.as_text(example[e.input_key]),
    "target": base.as_text(example[e.target_key]),
  }


def _import_builder_module(e: CatalogEntry) -> None:
  # TFDS registers a catalog builder when its module is imported; without TensorFlow the
  # automatic lookup does not import it, so import it explicitly.
  importlib.import_module(f"tensorflow_datasets.{e.module}")


def catalog_source(
  name: str,
  split: str,
  *,
  data_dir: str | None = None,
  manual_dir: str | None = None,
  download: bool = False,
) -> grain.MapDataset:
  """A random-access ``MapDataset`` of ``{"input", "target"}`` for a catalog dataset split.

  Args:
    name: ``xsum``, ``cnn_dailymail``, ``samsum`` or ``reddit_tifu`` (``tfds:`` prefix ok).
    split: ``train``, ``validation``, ``test`` or a TFDS slice such as ``train[:1%]``.
    data_dir: where the array_record data was prepared (default: :func:`base.default_data_dir`).
    manual_dir: the directory with the manually downloaded files (samsum).
    download: prepare the data on this machine if missing (needs TensorFlow and network).

  Raises:
    CatalogNotPreparedError: the data is not in ``data_dir`` in array_record format.
  """
  e = entry(name)
  _import_builder_module(e)
  data_dir = data_dir or base.default_data_dir()
  b = tfds.builder(e.tfds_name, data_dir=data_dir, file_format="array_record")
  how = (
    f"prepare it where TensorFlow and the network are available with `tfds build "
    f"{e.tfds_name} --file_format=array_record --data_dir={data_dir}"
    + (" --manual_dir=DIR`" if e.needs_manual_dir else "`")
    + ", or pass download=True on such a machine"
  )
  if download:
    if e.needs_manual_dir and not manual_dir:
      raise ValueError(f"{name} needs manual_dir=<folder with its downloaded files>; {how}.")
    try:
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as err:  # noqa: BLE001 - re-raised with the fix attached
      raise CatalogNotPreparedError(f"preparing {e.tfds_name} failed ({err!r}); {how}.") from err
  try:
    source = b.as_data_source(split=split)
  except Exception as err:  # noqa: BLE001 - TFDS raises several types for "not prepared"
    raise CatalogNotPreparedError(
      f"{e.tfds_name} split {split!r} is not available as array_record under {data_dir} "
      f"({type(err).__name__}: {str(err)[:200]}); {how}."
    ) from err
  return grain.MapDataset.source(source).map(lambda ex: to_seq2seq(name, ex))
