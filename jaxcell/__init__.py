"""jaxcell: leukemia blood-smear classifiers in JAX, with PyTorch twins and parity checks."""

import os
from pathlib import Path

__version__ = "0.1.0"

CLASS_NAMES = ("Benign", "Early", "Pre", "Pro")


def cache_dir(kind: str) -> Path:
    """Where jaxcell keeps what it builds (`kind`: "tfds", "onednn"): $JAXCELL_CACHE/kind if set,
    else ~/.cache/jaxcell/kind."""
    base = os.environ.get("JAXCELL_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "jaxcell") / kind
