"""Checkpoints of what training changed: format, writer, discovery and export."""
