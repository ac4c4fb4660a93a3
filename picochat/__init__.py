"""picochat: train a small ChatGPT-style model end to end and talk to it."""

__version__ = "0.1.0"
