"""slicjax: sequence likelihood calibration and preference optimization for JAX decoders.

Shape letters used in tensor names throughout the package (``logits_BxLxV``, ``logp_BxK``):

  B  batch (inputs / prompts)
  K  candidates per input
  N  samples per prompt before rejection sampling (RSO), or SSM state size in models/ssm.py
  M  accepted samples per prompt after rejection sampling
  S  input (encoder / prompt) length
  L  target / candidate length
  V  vocabulary size
  D  model dimension
  H  attention heads (G: key/value heads under grouped-query attention)
  F  feed-forward (MLP) dimension
  T  diffusion time / decoding steps

Sub-packages are imported explicitly (``from slicjax import scoring``); this file holds no
heavy imports so ``import slicjax`` stays cheap.
"""

__version__ = "0.1.0"
