"""TFDS builders (array_record, no TensorFlow at runtime) and catalog wrappers.

* :mod:`~slicjax.data.builders.stdlib_docstrings` — the embedded default dataset;
* :mod:`~slicjax.data.builders.debian_descriptions` — installed packages' descriptions (dpkg);
* :mod:`~slicjax.data.builders.jsonl_seq2seq` — local ``{"input", "target"}`` files;
* :mod:`~slicjax.data.builders.jsonl_preference` — preference pairs and SLiC candidate sets;
* :mod:`~slicjax.data.builders.catalog` — xsum, cnn_dailymail, samsum, reddit_tifu.
"""
