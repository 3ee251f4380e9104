"""One line of meaning for every config key the jobs check, and the ``--helpconfig`` text.

The key tables themselves stay where the code checks them (``tasks.DATA_KEYS``,
``mle.TRAIN_KEYS``, ``optim.DEFAULTS``, the model config dataclasses via
:func:`slicjax.models.factory.model_keys`, ...). This module holds a ``*_DOCS`` dict per table
with the same keys; :data:`SECTIONS` pairs each config section with its table and docs,
and ``tests/test_cli.py`` fails when a checked key has no description here (or a description
names a key the code no longer checks), so the help cannot drift from the code.

A model key's families (``[ssm]``, ``[transformer, diffusion]``) are added to its line from
:func:`~slicjax.models.factory.family_keys`; the docs below do not repeat them.
"""

from __future__ import annotations

from typing import Any

MODEL_DOCS = {
  "family": "Model family: transformer, ssm (state-space) or diffusion (masked diffusion LM).",
  "preset": "Named size (tiny, small, 10m, 100m) whose values every unset size key takes.",
  "vocab_size": "Embedding rows; must be >= the tokenizer's vocabulary (data.vocab_size).",
  "d_model": "Residual width.",
  "num_heads": "Attention heads (ssm: of the encoder and the cross-attention).",
  "num_kv_heads": "Key/value heads (grouped-query attention); ssm encoder: 0 = num_heads.",
  "head_dim": "Width of one attention head; ssm encoder: 0 = d_model // num_heads.",
  "d_ff": "Hidden width of the MLPs; ssm encoder: 0 = 4 * d_model.",
  "num_layers": "Decoder layers (ssm: only with a preset, becomes n_layers).",
  "num_encoder_layers": "Encoder layers: 0 = decoder-only (prefix LM), > 0 = encoder-decoder.",
  "norm": "Normalization: rms (RMSNorm) or layer (LayerNorm).",
  "norm_eps": "Epsilon of the normalization layers.",
  "position": "Positions: rope, relative (T5 bias), learned or none.",
  "rope_theta": "RoPE base frequency.",
  "relative_buckets": "T5 relative-position buckets.",
  "relative_max_distance": "Distance beyond which T5 relative positions share one bucket.",
  "mlp": "MLP kind: swiglu, geglu, gelu or relu.",
  "tie_embeddings": "Output logits from the token embedding table (no separate output layer).",
  "tied_logit_scale": "Scale tied logits by d_model**-0.5 (T5).",
  "scale_queries": "Scale queries by 1/sqrt(head_dim) (T5 folds it into the init instead).",
  "use_bias": "Biases on every dense layer.",
  "qkv_bias": "Biases on the query/key/value projections only (Qwen2).",
  "causal": "Causal self-attention (diffusion always sets false).",
  "max_len": "Longest sequence (positions and decode cache); ssm: longest input and target.",
  "dropout_rate": "Dropout rate during training.",
  "dtype": "Compute dtype: float32 or bfloat16.",
  "param_dtype": "Parameter dtype.",
  "remat": "Rematerialize each block in the backward pass (less memory, more compute).",
  "scan_layers": "Build the layer stack with nn.scan (params stacked; faster compile when deep).",
  "cache_bucket": "Decoding attends over the smallest multiple-of-this cache that fits; 0 = all.",
  "decoder_start_id": "Token the decoder starts from (BOS = 2; T5 checkpoints use 0).",
  "n_layers": "Residual SSM blocks.",
  "d_state": "State size per SSM.",
  "variant": "SSM kind: s4d, s5 or selective.",
  "init": "Diagonal A init: lin, inv or real (S4D-Lin / -Inv / -Real).",
  "discretization": "Discretization: zoh or bilinear.",
  "expand": "Inner width = expand * d_model.",
  "dropout": "Dropout rate on block outputs and embeddings (training only).",
  "conv_width": "Width of the short causal convolution before the SSM; 0 disables it.",
  "dt_min": "Lower end of the log-uniform Delta init.",
  "dt_max": "Upper end of the log-uniform Delta init.",
  "dt_rank": "Rank of the selective Delta projection; 0 = ceil(d_model / 16).",
  "train_mode": "How training computes the SSM: auto, conv (FFT), scan or recurrent.",
  "encoder_position": "Encoder positions: relative, rope, learned or none.",
  "encoder_mlp": "Encoder MLP kind: swiglu, geglu, gelu or relu.",
  "schedule": "Masking schedule: linear, cosine or polynomial[:k].",
  "num_elbo_samples": "Monte Carlo samples per ELBO estimate (the sequence log-likelihood).",
  "sampler_threshold": "Confidence threshold of the parallel sampler used for decoding.",
  "sampler": "Diffusion commit rule when decoding: threshold, factor or topk (1 per step).",
  "sampler_factor": "f of the factor rule: commit n with (n+1)(1-c_n) < f (Fast-dLLM).",
  "block_length": "Block-causal diffusion: canvas blocks of this size, KV-cached; 0 = one block.",
  "shift": "Slot j's logits read at position j-1, as an AR LM (for AR-initialized models).",
  "causal_prompt": "Block-causal diffusion: the prompt attends causally, as in an AR model.",
  "eos_fill": "Diffusion decoding: PAD's mass goes to EOS at masked slots; after EOS all PAD.",
}

DATA_DOCS = {
  "distill_from": "Train on a candidate dir's outputs (inputs, first candidate), e.g. a draft.",
  "name": "Task: reverse, stdlib_docstrings, debian_descriptions (dpkg), jsonl or tfds:<name>.",
  "dpkg_status": "debian_descriptions: the dpkg status file; empty = /var/lib/dpkg/status.",
  "input_len": "Input tokens per example (longer inputs are truncated); 0 = 98th pct of train.",
  "target_len": "Target tokens per example incl. EOS (longer are cut); 0 = 98th pct of train.",
  "vocab_size": "Vocabulary of the SentencePiece tokenizer trained on the task's text.",
  "num_train": "reverse: number of training examples.",
  "num_eval": "reverse: number of evaluation examples.",
  "data_dir": "Where prepared datasets live; empty = $SLICJAX_DATA_DIR or the default.",
  "cache_dir": "Where trained tokenizers are cached; empty = the default cache.",
  "train_path": "jsonl: the training file, one JSON object per line.",
  "eval_path": "jsonl: the evaluation file; empty = the last 10% of train_path.",
  "test_path": "jsonl: an optional test file (evaluate.split=test).",
  "input_key": "jsonl: the field holding the input text.",
  "target_key": "jsonl: the field holding the target text.",
  "tokenizer_path": "An existing SentencePiece .model to use instead of training one.",
  "packing": "Pack several examples per training row.",
  "max_input_chars": "Longest input text in characters (stdlib_docstrings, jsonl).",
  "synthetic_vocab": "reverse: number of token ids.",
}

OPTIMIZER_DOCS = {
  "name": "Optimizer: adamw, adafactor or sgd.",
  "learning_rate": "Peak learning rate.",
  "warmup_steps": "Linear warmup steps from 0 to learning_rate.",
  "schedule": "After warmup: cosine, linear, rsqrt or constant.",
  "decay_steps": "Length of the decay after warmup; 0 = the rest of training.",
  "end_lr_fraction": "cosine/linear: final learning rate as a fraction of the peak.",
  "weight_decay": "Decoupled weight decay.",
  "b1": "Adam beta1.",
  "b2": "Adam beta2.",
  "eps": "Adam epsilon.",
  "clip_norm": "Global gradient-norm clipping; 0 = off.",
  "grad_accum_steps": "Micro-batches accumulated per update.",
  "freeze": "Comma-separated regexes over parameter paths that are not trained.",
}

TRAIN_DOCS = {
  "steps": "Training steps (a rerun resumes from the newest checkpoint).",
  "batch_size": "Global batch size (a multiple of the mesh's data x fsdp size).",
  "log_every": "Steps between metric lines in metrics.jsonl.",
  "eval_every": "Steps between validation evaluations; 0 = never.",
  "eval_batches": "Validation batches per evaluation.",
  "checkpoint_every": "Steps between checkpoints (the last step is always saved).",
  "keep_checkpoints": "Checkpoints kept on disk.",
  "seed": "Seed of the init and of the data order.",
  "label_smoothing": "Label smoothing of the token cross-entropy.",
  "z_loss": "Weight of the log-partition (z) loss.",
  "progress": "Show a progress bar.",
  "keep_best": "With eval_every > 0: keep the best-validation params in <workdir>/best.",
}

PRETRAINED_DOCS = {
  "init_from": "Start from a .gguf file, a Hugging Face directory or a workdir instead of model.",
  "prompt_format": "How inputs become prompts: chat (the model's template) or raw.",
  "instruction": "Instruction put before every input.",
  "system_prompt": "chat: the system message.",
  "raw_template": "raw: the prompt template ({instruction}, {input}).",
  "max_len": "Model max_len; 0 = fit data.input_len + data.target_len.",
  "dtype": "Parameter dtype of the loaded weights.",
}

LORA_DOCS = {
  "rank": "LoRA rank; 0 = train all weights, > 0 = train adapters only.",
  "alpha": "LoRA scale numerator (scale = alpha / rank).",
  "targets": "Regex over parameter paths of the kernels that get adapters.",
}

CANDIDATE_DOCS = {
  "finetuned_workdir": "Workdir of the fine-tuned model that decodes.",
  "split": "Split to decode: train or validation.",
  "num_examples": "Examples decoded.",
  "num_candidates": "Candidates per example.",
  "method": "Decoding: beam, diverse_beam, sample or greedy.",
  "similarity": "Similarity to the target: latent, rouge, token_embedding or none (rouge, the "
  "mean of ROUGE-1/2/L F, is the SLiC study's validation choice).",
  "batch_size": "Examples per decoding batch.",
  "chunk_size": "Examples per output chunk (the unit of resumption).",
  "seed": "Sampling seed.",
  "temperature": "sample: softmax temperature.",
  "top_k": "sample: keep the k most likely tokens; 0 = all.",
  "top_p": "sample: nucleus probability mass.",
  "alpha": "Beam length-penalty exponent; 0 = none.",
  "num_groups": "diverse_beam: beam groups.",
  "diversity_strength": "diverse_beam: penalty on tokens chosen by earlier groups.",
  "store_ref_topk": "Store each target token's top-k reference log-probs (for kl_topk); 0 = no.",
  "rouge_workers": "Processes computing ROUGE.",
  "max_len": "Longest candidate; 0 = data.target_len.",
  "progress": "Show a progress bar.",
  "length_penalty_style": "Beam length penalty: gnmt (((5+|y|)/6)**alpha) or power (|y|**alpha).",
  "finish_top_2k": "Beam: keep finished hypotheses ranked in the top 2K (T5X style).",
  "draft": "Speculative draft for greedy/sample: none, layer_skip:N, or a draft run's workdir.",
  "num_draft": "Draft tokens proposed per speculative round (gamma).",
}

CALIBRATE_DOCS = {
  "candidates_dir": "Candidate chunks written by generate_candidates.",
  "finetuned_workdir": "Workdir of the fine-tuned model to calibrate.",
  "loss": "Calibration loss: rank, margin, list_rank or expected_reward.",
  "beta": "Margin / temperature of the calibration loss.",
  "pairs": "Candidate pairs: random, best_worst or all.",
  "regularizer": "Regularizer: ce, kl, kl_topk or none.",
  "reg_weight": "Weight of the regularizer.",
  "steps": "Calibration steps.",
  "batch_size": "Examples per step.",
  "log_every": "Steps between metric lines.",
  "checkpoint_every": "Steps between checkpoints.",
  "keep_checkpoints": "Checkpoints kept on disk.",
  "seed": "Seed.",
  "progress": "Show a progress bar.",
  "allow_partial_candidates": "Accept a candidate set whose generation stopped part-way.",
}

EVAL_DOCS = {
  "beam_sizes": "Beam sizes of the quality grid (1 = greedy).",
  "alphas": "Length-penalty exponents of the quality grid.",
  "num_examples": "Examples evaluated; 0 = the whole split.",
  "batch_size": "Examples per decoding batch.",
  "calibration_candidates": "Candidates per example in the likelihood-quality report.",
  "repetition_ngram": "n of the repeated-n-gram rate.",
  "max_len": "Longest output; 0 = data.target_len.",
  "progress": "Show a progress bar.",
  "length_penalty_style": "Beam length penalty: gnmt or power.",
  "finish_top_2k": "Beam: keep finished hypotheses ranked in the top 2K (T5X style).",
  "split": "Split evaluated: validation (choosing recipes) or test (the report).",
  "selective": "Selective-generation report: coverage-quality curves, areas, AUROC.",
  "selective_beam": "Beam size whose top output the selective report ranks.",
  "selective_scores": "Confidence scores: logp, logp_norm, self_eval, multi_choice.",
  "selective_prompt_len": "Self-evaluation prompt length (<= model max_len - 4); 0 = input_len.",
}

REWARD_DOCS = {
  "kind": "Reward model: pointwise (Bradley-Terry) or ranker (pairwise text-to-text).",
  "pairs": "Preference pairs: a pair directory or a {prompt, chosen, rejected} .jsonl.",
  "init_from": "Workdir whose parameters initialize the backbone; empty = random init.",
  "steps": "Training steps.",
  "batch_size": "Pairs per step.",
  "eval_fraction": "Fraction of prompts held out for the pair-accuracy report.",
  "eval_every": "Steps between held-out checks; keeps the best step, chosen on half the "
  "held-out prompts and reported on the other half (0 = last step).",
  "log_every": "Steps between metric lines.",
  "checkpoint_every": "Steps between checkpoints.",
  "keep_checkpoints": "Checkpoints kept on disk.",
  "seed": "Seed.",
  "symmetric": "ranker: average both presentation orders.",
  "progress": "Show a progress bar.",
}

RSO_DOCS = {
  "draft": "Speculative draft for sampling: none, layer_skip:N, or a draft run's workdir.",
  "num_draft": "Draft tokens proposed per speculative round (gamma).",
  "sft_workdir": "Workdir of the SFT policy that samples.",
  "reward_workdir": "Workdir of the reward model (reward=model).",
  "reward": "Reward: model (reward_workdir) or gold (ROUGE to the target).",
  "mode": "rso (rejection sampling, rso-sample-rank) or sft (first M samples, sft-sample-rank).",
  "split": "Split whose prompts are sampled: train or validation.",
  "num_examples": "Prompts sampled.",
  "num_samples": "Samples N per prompt.",
  "num_accept": "Samples M kept per prompt (>= 2).",
  "beta": "Rejection-sampling temperature: 0 = top-M by reward, large = random M.",
  "max_rounds": "Rejection-sampling rounds; 0 = until M are accepted.",
  "ranking": "Pair labelling: tournament or first_round.",
  "temperature": "Sampling temperature.",
  "top_k": "Keep the k most likely tokens; 0 = all.",
  "top_p": "Nucleus probability mass.",
  "max_len": "Longest sample; 0 = data.target_len.",
  "batch_size": "Prompts per batch.",
  "chunk_size": "Prompts per output chunk (a multiple of batch_size; the unit of resumption).",
  "seed": "Seed.",
  "symmetric": "ranker: average both presentation orders.",
  "ranker_baseline": "ranker reward baseline y_b: first_sample (RSO) or target.",
  "progress": "Show a progress bar.",
}

PREFERENCE_DOCS = {
  "loss": "Loss: sigmoid_norm, dpo, hinge, hinge_norm, ipo, ipo_seq or slic_hf.",
  "beta": "dpo/ipo/ipo_seq: scale of the log-ratio margin (IPO target 1/(2 beta)).",
  "gamma": "RSO's scale for sigmoid_norm, hinge and hinge_norm (paper: 0.05).",
  "slic_hf_target": "slic_hf y_ref: target (SFT target) or best_ranked (best sample).",
  "delta": "hinge/slic_hf: the margin.",
  "label_smoothing": "sigmoid_norm/dpo: assumed label-flip probability in [0, 0.5).",
  "reg_weight": "slic_hf: weight of the target cross-entropy.",
  "pair_source": "Pairs: direct, sft-sample-rank or rso-sample-rank.",
  "pairs": "Pair directory or {prompt, chosen, rejected} .jsonl (written first if empty).",
  "sft_workdir": "Workdir of the SFT policy (the start and the reference).",
  "ref_logp": "Reference log-probs: stored (read from the pairs) or on_the_fly.",
  "steps": "Training steps.",
  "batch_size": "Pairs per step.",
  "log_every": "Steps between metric lines.",
  "checkpoint_every": "Steps between checkpoints.",
  "keep_checkpoints": "Checkpoints kept on disk.",
  "seed": "Seed.",
  "progress": "Show a progress bar.",
}

HUMAN_DOCS = {
  "policy_steps": "SFT steps of the early snapshot that writes the 'human' pairs.",
  "num_prompts": "Prompts with a 'human' pair.",
  "num_samples": "Samples per prompt; the pair is the gold-best vs the gold-worst.",
  "min_gold_gap": "Drop pairs whose gold rewards differ by less (0 = keep all).",
  "temperature": "Sampling temperature of the 'human' samples.",
  "gold_temperature": "Bradley-Terry temperature of the gold-reward labels.",
  "seed": "Seed.",
}

EXPERIMENT_DOCS = {
  "losses": "Preference losses compared.",
  "sources": "Pair sources compared.",
  "eval_examples": "Held-out prompts judged.",
  "eval_batch_size": "Prompts per decoding batch of the judgement.",
  "eval_split": "Split judged: validation or test (outputs then named *_test).",
}

TOP_LEVEL_DOCS = {
  "mesh_shape": "Device mesh (data, fsdp, tensor); -1 takes the remaining devices.",
  "compilation_cache": "JAX compilation cache: default, a directory, or off.",
  "calibrate_losses": "Comma-separated calibration losses compared side by side; '' = one.",
}

SECTION_DOCS = {
  "model": "the model to build (unset keys: the preset's value, else the family's default)",
  "reward_model": "the reward model's backbone (model keys)",
  "data": "the task",
  "optimizer": "the optimizer",
  "reward_optimizer": "the reward model's optimizer",
  "calibrate_optimizer": "the calibration stage's optimizer",
  "preference_optimizer": "the preference stage's optimizer",
  "train": "MLE fine-tuning",
  "pretrained": "start from a pretrained checkpoint",
  "lora": "LoRA adapters",
  "candidates": "candidate decoding and scoring",
  "calibrate": "SLiC calibration",
  "evaluate": "evaluation",
  "reward": "reward-model training",
  "rso": "sampling and ranking preference pairs",
  "preference": "preference optimization",
  "human": "the synthetic 'human' pairs",
  "experiment": "the synthetic-gold experiment",
}


# Each config section -> (module, attribute) of the key table its job checks, and its docs.
# ("slicjax.models.factory", "model_keys") is called: the union of the model dataclasses' fields.
SECTIONS: dict[str, tuple[str, str, dict[str, str]]] = {
  "model": ("slicjax.models.factory", "model_keys", MODEL_DOCS),
  "reward_model": ("slicjax.models.factory", "model_keys", MODEL_DOCS),
  "data": ("slicjax.pipelines.tasks", "DATA_KEYS", DATA_DOCS),
  "optimizer": ("slicjax.optim", "DEFAULTS", OPTIMIZER_DOCS),
  "reward_optimizer": ("slicjax.optim", "DEFAULTS", OPTIMIZER_DOCS),
  "calibrate_optimizer": ("slicjax.optim", "DEFAULTS", OPTIMIZER_DOCS),
  "preference_optimizer": ("slicjax.optim", "DEFAULTS", OPTIMIZER_DOCS),
  "train": ("slicjax.pipelines.mle", "TRAIN_KEYS", TRAIN_DOCS),
  "pretrained": ("slicjax.pipelines.common", "PRETRAINED_KEYS", PRETRAINED_DOCS),
  "lora": ("slicjax.pipelines.common", "LORA_KEYS", LORA_DOCS),
  "candidates": ("slicjax.pipelines.candidates", "CANDIDATE_KEYS", CANDIDATE_DOCS),
  "calibrate": ("slicjax.pipelines.calibrate", "CALIBRATE_KEYS", CALIBRATE_DOCS),
  "evaluate": ("slicjax.pipelines.evaluate", "EVAL_KEYS", EVAL_DOCS),
  "reward": ("slicjax.pipelines.reward", "REWARD_KEYS", REWARD_DOCS),
  "rso": ("slicjax.pipelines.rso", "RSO_KEYS", RSO_DOCS),
  "preference": ("slicjax.pipelines.preference", "PREFERENCE_KEYS", PREFERENCE_DOCS),
  "human": ("slicjax.pipelines.gold_experiment", "HUMAN_KEYS", HUMAN_DOCS),
  "experiment": ("slicjax.pipelines.gold_experiment", "EXPERIMENT_KEYS", EXPERIMENT_DOCS),
}


def section_table(section: str) -> tuple[dict[str, Any], dict[str, str]] | None:
  """``(checked key table, docs)`` of a config section (its module imported only now), or
  None for a section no job checks."""
  if section not in SECTIONS:
    return None
  import importlib

  module, attr, docs = SECTIONS[section]
  table = getattr(importlib.import_module(module), attr)
  return (table() if callable(table) else table), docs


def section_tables() -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
  """``{section: (checked key table, docs)}`` for every config section a job reads."""
  return {section: section_table(section) for section in SECTIONS}


def _families(key: str) -> str:
  from slicjax.models import factory

  fams = [f for f, keys in factory.family_keys().items() if key in keys]
  return "" if len(fams) == len(factory.FAMILIES) else "[" + ", ".join(fams) + "] "


def key_doc(section: str | None, key: str) -> str | None:
  """The description of ``section.key`` (``section=None``: a top-level key), or None."""
  if section is None:
    return TOP_LEVEL_DOCS.get(key)
  docs = SECTIONS[section][2] if section in SECTIONS else {}
  if key not in docs:
    return None
  return (_families(key) if docs is MODEL_DOCS else "") + docs[key]


def _value(v) -> str:
  if isinstance(v, str):
    return repr(v)
  if isinstance(v, (list, tuple)):
    return "(" + ",".join(_value(x) for x in v) + ")"
  return str(v).lower() if isinstance(v, bool) else str(v)


def _model_unset(section_dict: dict[str, Any]):
  """``key -> text`` for unset (None) model keys: ``unset (=value)`` where the family has it."""
  from slicjax.models import factory

  family = section_dict.get("family") or "transformer"
  try:
    resolved = factory.resolved_defaults(family, section_dict.get("preset"))
  except (KeyError, TypeError):
    resolved = {}
  keys = factory.family_keys().get(family, {})
  return lambda k: f"unset (={_value(resolved[k])})" if k in keys and k in resolved else "unset"


UNDOCUMENTED = "(no description)"


def describe(config, *, title: str = "", prefix: str = "--config.") -> str:
  """Every key of ``config`` (a ``ConfigDict`` or dict) with its value and meaning, one line
  each, grouped by section: the ``--helpconfig`` text. Each line reads
  ``<prefix><section>.<key>=<value>  <meaning>``."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  lines = [title] if title else []
  if any(v is None for sd in d.values() if isinstance(sd, dict) for v in sd.values()):
    lines.append(
      "'unset' model keys take the preset's value, else the family's default (shown as =value)."
    )
  top = {k: v for k, v in d.items() if not isinstance(v, dict)}
  rows = [(k, _value(v), key_doc(None, k) or UNDOCUMENTED) for k, v in top.items()]
  if rows:
    lines.append("\ntop level")
    lines += _format(prefix, rows)
  for section, sd in d.items():
    if not isinstance(sd, dict):
      continue
    unset = _model_unset(sd) if section in ("model", "reward_model") else lambda k: "unset"
    header = SECTION_DOCS.get(section)
    lines.append(f"\n{section}" + (f": {header}" if header else ""))
    rows = [
      (f"{section}.{k}", unset(k) if v is None else _value(v),
       key_doc(section, k) or UNDOCUMENTED)
      for k, v in sd.items()
    ]
    lines += _format(prefix, rows)
  return "\n".join(lines) + "\n"


def _format(prefix: str, rows) -> list[str]:
  """Aligned ``<prefix><key>=<value>  <meaning>`` lines (the meaning on its own line after a
  very long setting)."""
  width = max(len(prefix + k) + 1 + len(v) for k, v, _ in rows)
  width = min(width, 58)
  out = []
  for k, v, doc in rows:
    left = f"{prefix}{k}={v}"
    out.append(f"  {left:<{width}}  {doc}" if len(left) <= width else f"  {left}\n"
               f"  {'':<{width}}  {doc}")
  return out
