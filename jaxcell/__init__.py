"""jaxcell: leukemia blood-smear classifiers in JAX, with PyTorch twins and parity checks."""

from jaxcell._malloc import keep_freed_memory

keep_freed_memory()  # Linux/glibc CPU hosts: no page faults on XLA's per-step temporaries

__version__ = "0.1.0"

CLASS_NAMES = ("Benign", "Early", "Pre", "Pro")
