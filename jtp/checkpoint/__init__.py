"""Checkpoint files: sharded orbax checkpoints, consolidated exports, the safetensors writer."""
