"""The model card: what the served model is, what it was trained on, how well it did, where it stops.

Everything comes from files the run already holds; nothing is measured at start-up:
  config.json        architecture, arguments, input size, preprocessing, data, split, recipe
  metrics.jsonl      the validation accuracy of the served checkpoint's epoch
  calibration.json   the temperature (jaxcell evaluate fits it)
  ood.json           the out-of-distribution detector and its threshold (jaxcell ood fits it)
  *.json             evaluation reports of this checkpoint that `jaxcell evaluate --out DIR/NAME.json`
                     wrote into the workdir: accuracy and ECE, clean or stain-shifted, per split
"""

from __future__ import annotations

import datetime
import glob
import json
import os

import jaxcell

NOTICE = ("A research tool, not a diagnostic device: its answers must not be used to diagnose, treat or "
          "exclude disease in anyone.")


def _parameters(variables) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(variables["params"])))


def _trained_on(workdir: str) -> str | None:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    return datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc).isoformat(timespec="seconds")


def evaluations(workdir: str, step: int) -> list[dict]:
    """The evaluation reports in the workdir that evaluated this checkpoint alone (no ensemble)."""
    found = []
    for path in sorted(glob.glob(os.path.join(workdir, "*.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError):
            continue
        if not (isinstance(r, dict) and "accuracy" in r and isinstance(r.get("members"), list)):
            continue  # config.json, calibration.json, ood.json, ...
        if len(r["members"]) != 1 or r["members"][0].get("checkpoint_step") != step:
            continue
        shift = r.get("stain_shift")
        found.append({"file": os.path.basename(path), "data": r.get("data"), "tta": r.get("tta", False),
                      "stain_shift": shift["strength"] if shift else None, "examples": r.get("num_examples"),
                      "accuracy": r["accuracy"], "macro_f1": r.get("macro_f1"), "ece": r.get("ece"),
                      "ece_calibrated": r.get("ece_calibrated")})
    return sorted(found, key=lambda e: (str(e["data"]), e["stain_shift"] or 0, e["tta"]))  # clean first


def model_card(predictor, startup: dict | None = None) -> dict:
    from jaxcell.train import read_history

    record, workdir = predictor.record, predictor.workdir
    kwargs = {k: v for k, v in record["model_kwargs"].items() if k not in ("num_classes", "image_size")}
    size = predictor.image_size
    data = record.get("data", {})
    train = record.get("train", {})
    validation = None
    if workdir:
        epoch = [e for e in read_history(workdir) if e.get("step") == predictor.step and "val_accuracy" in e]
        if epoch:
            validation = {"epoch": epoch[-1]["epoch"], "accuracy": epoch[-1]["val_accuracy"],
                          "examples": data.get("sizes", {}).get("val")}
    detector = predictor.detector.describe() if predictor.detector is not None else None
    return {
        "model": record["model"] + (f" ({train['recipe']})" if train.get("recipe") else ""),
        "architecture": {"name": record["model"], "arguments": kwargs, "parameters": _parameters(predictor.variables),
                         "input_size": [size, size, 3], "preprocessing": record["preprocessing"]},
        "classes": predictor.class_names,
        "training": {"data": data.get("source"), "split": data.get("split_note") or None,
                     "sizes": data.get("sizes") or None, "epochs": train.get("epochs"),
                     "hardware": record.get("hardware")},
        "served": {"source": os.path.abspath(predictor.source), "checkpoint_step": predictor.step,
                   "trained": _trained_on(workdir) if workdir else None,
                   "imported": record.get("imported")},
        "validation": validation,
        "evaluations": evaluations(workdir, predictor.step) if workdir else [],
        "calibration": {"temperature": predictor.temperature, "note": predictor.calibration_note},
        "detector": detector,
        "detector_note": None if detector else (
            "no out-of-distribution detector: every image is answered without a check that it resembles "
            "the training images" + (f"; fit one with: jaxcell ood --workdir {workdir}" if workdir else "")),
        "startup": startup,
        "version": jaxcell.__version__,
        "notice": NOTICE,
    }
