"""The training toolkit: data, checkpoints that never lose work, and the training commands (accelerate lives here)."""
