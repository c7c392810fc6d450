"""jaxcell: leukemia blood-smear classifiers in JAX, with PyTorch twins and parity checks."""

__version__ = "0.1.0"

CLASS_NAMES = ("Benign", "Early", "Pre", "Pro")
