"""End-to-end jobs (one function per experiment binary): MLE training, candidate generation,
calibration, evaluation, preference training. Binaries in ``experiments/`` only parse flags."""
