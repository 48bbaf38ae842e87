"""The registered model's name and aliases, once: a base module, so the parameters (their defaults)
and the registry (which acts on them) both read them without one importing the other."""

MODEL_NAME = "lmforge-chat"  # the registered model (params: registry.model_name)
CHAMPION = "champion"  # the alias that serves: moved only when every evaluation gate passes
CANDIDATE = "candidate"  # a version that failed a gate
