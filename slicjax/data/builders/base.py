"""Shared helpers for the TFDS builders: data directories, content hashes, preparing, decoding.

Every builder in this package is a ``tfds.core.GeneratorBasedBuilder`` that writes
``array_record`` files (no TensorFlow at runtime) and is read back through
``builder.as_data_source(split)``, a random-access source that grain consumes directly.

Builders whose content depends on local files or options get a ``BuilderConfig`` whose name is
a hash of that content (:func:`config_name`), so a changed file or option gives a new,
separately cached directory instead of silently reusing stale records.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import logging
import os
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

DATA_DIR_ENV = "SLICJAX_DATA_DIR"


class _HideCustomConfigWarning(logging.Filter):
  """TFDS warns on every custom BuilderConfig; ours are all custom (content-hash names)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_HideCustomConfigWarning())


def _code_path(cls) -> epath.Path:
  return epath.Path(inspect.getfile(cls))


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of this package's builders.

  Overrides ``code_path``: TFDS 4.9's default resolves it through the ``importlib_resources``
  backport, which is not installed on Python >= 3.9, for any builder defined in a package.
  """

  code_path = tfds.core.utils.classproperty(classmethod(_code_path))


def default_data_dir() -> str:
  """Where prepared datasets live: ``$SLICJAX_DATA_DIR`` or ``~/.cache/slicjax/tfds``."""
  return os.environ.get(DATA_DIR_ENV) or os.path.join(
    os.path.expanduser("~"), ".cache", "slicjax", "tfds"
  )


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def config_name(prefix: str, payload: Any) -> str:
  """A config name ``<prefix>_<12 hex>`` that changes whenever the JSON ``payload`` changes."""
  blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
  return f"{prefix}_{hashlib.sha256(blob).hexdigest()[:12]}"


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Runs ``download_and_prepare`` (a no-op when the directory already holds the data).

  Local builders download nothing, so TFDS's bold "Downloading and preparing dataset Unknown
  size ..." banner (printed to stdout) is replaced by one log line naming what is built where.
  """
  where = f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}"
  for hook, msg in (("_log_download_bytes", "building local dataset %s in %s"),
                    ("_log_download_done", "built local dataset %s in %s")):
    if hasattr(builder, hook):  # an instance attribute shadows TFDS's printing method
      setattr(builder, hook, lambda msg=msg: logging.info(msg, where, builder.data_dir))
  # Processes that build the same dataset at once (seeds run in parallel, pytest workers) take
  # turns: without the lock the second one's final rename fails on the first one's directory.
  # A builder made before another process finished sees no data yet; after the wait it reads
  # the dataset info that process wrote instead of reporting empty splits.
  data_dir = epath.Path(builder.data_dir)
  data_dir.parent.mkdir(parents=True, exist_ok=True)
  with open(data_dir.parent / f".{data_dir.name}.lock", "a") as lock:  # closing unlocks
    fcntl.flock(lock, fcntl.LOCK_EX)
    built_elsewhere = not builder.info.splits and (data_dir / "dataset_info.json").exists()
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    if built_elsewhere:
      builder.info.read_from_directory(data_dir)
  return builder


def as_text(value: Any) -> str:
  """Decodes a TFDS text feature (``bytes`` from array_record, ``str`` from mocks) to ``str``."""
  if isinstance(value, str):
    return value
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if hasattr(value, "item"):  # numpy scalar / 0-d array
    return as_text(value.item())
  raise TypeError(f"expected a text feature (str or bytes), got {type(value).__name__}.")


def data_source(builder: tfds.core.DatasetBuilder, split: str):
  """``builder.as_data_source(split)`` with a clear error for a split that holds no records."""
  available = sorted(builder.info.splits.keys())
  name = split.split("[", 1)[0]
  if name not in available:
    raise ValueError(
      f"dataset {builder.name}/{builder.builder_config.name if builder.builder_config else ''} "
      f"has no records in split {name!r} (splits with records: {available}); choose one of "
      "those, or add data for that split."
    )
  return builder.as_data_source(split=split)
