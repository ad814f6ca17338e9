"""Held-out evaluation outside the training loop: the offline `smolvla-ray evaluate`
command (`offline.py`) and the async mode's Ray Train validation task (`validation.py`).
Both run the trainer's own evaluation (`train/evaluation.py`); docs/evaluation.md says what
is measured."""
