"""Data: datasets, tokenizers and the grain input pipeline (no TensorFlow at runtime).

Modules (imported explicitly; this file imports nothing so ``import slicjax.data`` is cheap):

* ``sources`` — ``load_text_source(name, split)``: records ``{"input", "target"}`` from
  ``stdlib_docstrings`` (the embedded default), ``jsonl`` files or a TFDS catalog set;
  ``tokenizer_for_source(name)``: a trained (cached) or loaded tokenizer.
* ``builders/`` — the TFDS builders (array_record) behind those sources, plus preference
  pairs and the SLiC candidate-set format (``builders/jsonl_preference.py``).
* ``tokenizer`` — SentencePiece ``Tokenizer`` with pad=0, eos=1, bos=2, unk=3.
* ``pipeline`` — ``make_seq2seq_iterator`` / ``make_eval_batches``: tokenize, truncate
  (counted), pad or pack, shuffle, batch, shard per process; checkpointable iterators.
* ``synthetic`` — a token-level toy task; ``iterators`` — in-memory token-id batch iterators.

Typical use::

  from slicjax.data import pipeline, sources

  train = sources.load_text_source("stdlib_docstrings", "train")
  tok = sources.tokenizer_for_source("stdlib_docstrings", vocab_size=2000)
  it = pipeline.make_seq2seq_iterator(train, tok, batch_size=32, input_len=512, target_len=64)
  batch = next(it)             # {"inputs": int32[32, 512], "targets": int32[32, 64]}
  state = it.get_state()       # JSON-able; it.set_state(state) resumes exactly
"""
