"""Seeing a run from the driver: live progress (`progress`) and the run report (`report`).

Rank 0's metric sinks (metrics.jsonl, TensorBoard, MLflow, W&B) live in `smolvla_ray.train.metrics`.
"""
