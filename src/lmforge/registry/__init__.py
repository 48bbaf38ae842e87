"""The MLflow model registry at the edge: log the chat model, gate its promotion, read lineage.

The registered model's name and aliases live here, once (this module imports nothing heavy).
"""

MODEL_NAME = "lmforge-chat"  # the registered model (params: registry.model_name)
CHAMPION = "champion"  # the alias that serves: moved only when every evaluation gate passes
CANDIDATE = "candidate"  # a version that failed a gate
