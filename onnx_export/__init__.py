"""Export a Hugging Face backbone into per-layer ONNX segments (needs the `export` extra: torch, transformers)."""
