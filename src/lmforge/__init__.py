"""lmforge: raw text to a served chat model, reproducibly."""

__version__ = "0.1.0"
