"""lmforge: raw text to a served chat model, reproducibly."""

import os as _os

# Conditional numerical reproducibility for MKL and cuBLAS: read when those libraries start, so it
# is set here, before any lmforge module imports torch (see lmforge.seeding; a user's value wins).
DETERMINISM_ENV = {"MKL_CBWR": "AUTO", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
for _key, _value in DETERMINISM_ENV.items():
    _os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
