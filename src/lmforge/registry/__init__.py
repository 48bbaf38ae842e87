"""The MLflow model registry at the edge: log the chat model, gate its promotion, read lineage."""
