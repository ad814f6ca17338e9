"""Distributed training: the per-worker loop, trainable-only DDP, optimizer and schedule."""
