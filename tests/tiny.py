"""The suite's small configurations of the registered models (constructor arguments), kept in one
place: most tests check plumbing, not pixels, and with the same configurations everywhere they
share compiled programs through the persistent compilation cache."""

LIGHTNETCELL = {"widths": (8, 16, 16), "hidden": 16}
HYBRID_VIT = {"widths": (8, 8, 8), "dim": 16, "depth": 1, "heads": 2}
BRIN = {"width": 8, "depth": (1, 1), "groups": 2}  # every part, a strided block, grouped convolutions
MODELS = {"lightnetcell": LIGHTNETCELL, "hybrid_vit": HYBRID_VIT, "brin": BRIN}


def model_args(name: str) -> list[str]:
    """MODELS[name] as `jaxcell train` flags: --model-arg widths=(8,16,16) --model-arg hidden=16 ..."""
    return [arg for key, value in MODELS[name].items()
            for arg in ("--model-arg", f"{key}={value!r}".replace(" ", ""))]
