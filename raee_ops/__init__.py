"""raee-ops: retrieval-augmented early exiting for batch text classification."""

__version__ = "0.1.0"
