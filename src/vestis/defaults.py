"""Defaults that the command line needs before any model code loads (no torch here)."""

#: The trained default (configs/vestis-lite0.yaml): Lite0 stages 5-6 fine-tuned plus a head, fp16.
DEFAULT_MODEL = "vestis-lite0"
