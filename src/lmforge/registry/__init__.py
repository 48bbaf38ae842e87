"""The MLflow model registry at the edge: log the chat model, gate its promotion, read lineage.

The registered model's name and aliases are :mod:`lmforge.names` (this module imports nothing heavy).
"""

from lmforge.names import CANDIDATE, CHAMPION, MODEL_NAME

__all__ = ["CANDIDATE", "CHAMPION", "MODEL_NAME"]
