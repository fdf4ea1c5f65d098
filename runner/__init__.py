"""sandbox-runner: run untrusted Python, one hardened container per task."""

__version__ = "0.1.0"
