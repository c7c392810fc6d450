"""Calibration: expected calibration error, reliability bins and temperature scaling (numpy).

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T > 0 fitted on held-out
data by minimising the negative log-likelihood; it changes confidence, never the argmax. We fit
log T by golden-section search (NLL is unimodal in T for a single view; a bracket wide enough
for any model that trains: T in [0.05, 20]).

Logits may carry a leading axis of views, (V, N, K): test-time augmentation averages the V
softmaxes, so the fitted T is the one that calibrates the averaged prediction actually used.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

CALIBRATION_FILE = "calibration.json"
ECE_BINS = 15
LOG_T_RANGE = (math.log(0.05), math.log(20.0))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(-1, keepdims=True)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, K) logits -> (N, K); (V, N, K) views -> the mean of their softmaxes, (N, K)."""
    p = softmax(logits, temperature)
    return p.mean(0) if p.ndim == 3 else p


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    picked = np.asarray(probs, np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(picked, 1e-300)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, tolerance: float = 1e-4) -> float:
    """T minimising the NLL of `probabilities(logits, T)`: golden-section search on log T.

    1.0 when the NLL still falls at the smallest T of the range (LOG_T_RANGE): sharper is then
    always likelier, as when every example is classified right, and the "minimum" would make the
    model near one-hot on the strength of no error at all (and let it outweigh the other members
    of an ensemble). With no error to learn from, the model's own probabilities stay."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on no examples")

    def f(log_t: float) -> float:
        return nll(probabilities(logits, math.exp(log_t)), labels)

    ratio = (math.sqrt(5) - 1) / 2
    a, b = LOG_T_RANGE
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tolerance:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    log_t = (a + b) / 2
    return 1.0 if log_t - LOG_T_RANGE[0] < 1e-3 else float(math.exp(log_t))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin: count, mean confidence, accuracy (NaN for empty bins).

    Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 cannot occur.
    """
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    confidence = probs.max(-1)
    correct = (probs.argmax(-1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(index, confidence, bins) / count
        acc = np.bincount(index, correct, bins) / count
    return {"edges": np.linspace(0, 1, bins + 1).tolist(), "count": count.tolist(),
            "confidence": conf.tolist(), "accuracy": acc.tolist()}


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (bin share) * |accuracy - mean confidence|."""
    r = reliability(probs, labels, bins)
    count = np.asarray(r["count"], np.float64)
    if count.sum() == 0:
        return float("nan")
    gap = np.abs(np.nan_to_num(np.asarray(r["accuracy"]) - np.asarray(r["confidence"])))
    return float((count * gap).sum() / count.sum())


# ---------------------------------------------------------------------------------------------
# The workdir's calibration.json: one temperature per (checkpoint step, views), fitted on the
# validation split of the workdir's own data.

def _key(step: int, tta: bool) -> str:
    return f"step{int(step)}" + ("-tta" if tta else "")


def read_temperature(workdir: str, step: int, tta: bool) -> dict | None:
    path = os.path.join(workdir, CALIBRATION_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("temperatures", {}).get(_key(step, tta))


def write_temperature(workdir: str, step: int, tta: bool, entry: dict) -> None:
    path = os.path.join(workdir, CALIBRATION_FILE)
    record = {"temperatures": {}}
    if os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
    record.setdefault("temperatures", {})[_key(step, tta)] = entry
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
