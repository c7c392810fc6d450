"""The paper's Table I, measured: one row per trained run and split.

    jaxcell table --workdir runs/cpu --split val --split test --save-records results   # evaluate, keep
    jaxcell table --records results/cpu --split val --split test                      # the rows again

A row holds the paper's reported accuracy for the architecture, ours on clean images and on
stain-shifted copies (HED jitter, fixed seed), macro F1, expected calibration error (before
temperature scaling), parameters, forward FLOPs per image, training time and the hardware the
run trained on. Everything is measured from the workdir; nothing is copied from a log.

A run's records are the small files a row is made of: the workdir's config.json and
metrics.jsonl, and one evaluation report (what `jaxcell evaluate --out` writes) per split, clean
and shifted. A records folder has no checkpoints, so it can be committed, and the table rebuilt
from it by anyone; parameters and FLOPs are computed again (`jaxcell summary`), not stored.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

from jaxcell.errors import UserError
from jaxcell.evaluate import Datasets, run_evaluation
from jaxcell.summary import summarize
from jaxcell.train import CONFIG_FILE, METRICS_FILE, read_config, read_history

# Accuracy reported by the paper ("Multiclass Cancer Classification Using Deep Learning
# Architecture") for the architectures it trains; the others come from its literature review.
PAPER_ACCURACY = {"lightnetcell": "0.91", "brin": "0.99", "hybrid_vit": "> 0.98"}


def evaluation_file(split: str, shift: float = 0.0) -> str:
    """The name of a split's evaluation report in a records folder."""
    return f"evaluation-{split}" + (f"-hed{shift:g}" if shift else "") + ".json"


def evaluate_run(workdir: str, splits: list[str], shift: float = 0.03, checkpoint: str = "last",
                 log=lambda message: None) -> dict[str, dict]:
    """The evaluation reports a run's rows need: {file name: report}, clean and shifted per split."""
    datasets = Datasets(None)  # every evaluation of the run shares one load of the data
    reports = {}
    for split in splits:
        for s in (0.0, shift):
            reports[evaluation_file(split, s)] = run_evaluation(
                [workdir], checkpoint=checkpoint, split=split, shift=s, calibrate=False, resamples=0,
                datasets=datasets, log=log).result
    return reports


def save_records(workdir: str, reports: dict[str, dict], folder: str) -> None:
    """Copy the run's config.json and metrics.jsonl into `folder`, and write its evaluation reports."""
    os.makedirs(folder, exist_ok=True)
    for name in (CONFIG_FILE, METRICS_FILE):
        shutil.copyfile(os.path.join(workdir, name), os.path.join(folder, name))
    for name, report in reports.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


def read_records(folder: str, split: str, shift: float = 0.03) -> tuple[dict, list[dict], dict, dict]:
    """(config, history, clean report, shifted report) of a records folder."""
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise UserError(f"{folder} holds no run's records (no {CONFIG_FILE}); make them from a trained workdir "
                        f"with `jaxcell table --workdir WORKDIR --save-records DIR`")
    record = read_config(folder)
    reports = []
    for s in (0.0, shift):
        path = os.path.join(folder, evaluation_file(split, s))
        if not os.path.isfile(path):
            raise UserError(f"{folder} has no {os.path.basename(path)}; make it from the run's workdir with "
                            f"`jaxcell table --workdir WORKDIR --split {split} --shift {shift:g} --save-records "
                            f"{os.path.dirname(os.path.abspath(folder))}`")
        with open(path) as f:
            report = json.load(f)
        measured = (report["stain_shift"] or {}).get("strength", 0.0)
        if not report["data"].startswith(f"the {split} split") or measured != s:
            raise UserError(f"{path} is not the {split} split at HED shift {s:g} (it holds {report['data']}, "
                            f"shift {measured:g})")
        reports.append(report)
    return record, read_history(folder), reports[0], reports[1]


def run_name(record: dict) -> str:
    """The model and what sets the run apart: recipe, seed, a split seed of its own."""
    train = record["train"]
    parts = [f"`{train['recipe']}`"] if train.get("recipe") else []
    parts.append(f"seed {train['seed']}")
    if train.get("split_seed") is not None and train["split_seed"] != train["seed"]:
        parts.append(f"split seed {train['split_seed']}")
    return f"{record['model']} ({', '.join(parts)})"


@functools.lru_cache
def _size(model: str, model_kwargs: str) -> dict:
    """summarize() once per model and constructor arguments (a run's rows share it)."""
    kwargs = json.loads(model_kwargs)
    return summarize(model, kwargs.pop("image_size"), kwargs.pop("num_classes"), **kwargs)


def row(record: dict, history: list[dict], split: str, clean: dict, shifted: dict, workdir: str) -> dict:
    """A table row from a run's config, metrics history and clean / shifted reports on `split`."""
    size = _size(record["model"], json.dumps(record["model_kwargs"], sort_keys=True))
    return {
        "model": record["model"], "recipe": record["train"].get("recipe"), "name": run_name(record),
        "workdir": workdir, "paper_accuracy": PAPER_ACCURACY.get(record["model"], "-"),
        "split": split, "examples": clean["num_examples"], "checkpoint_step": clean["members"][0]["checkpoint_step"],
        "accuracy": clean["accuracy"], "shifted_accuracy": shifted["accuracy"],
        "shift": shifted["stain_shift"]["strength"],
        "macro_f1": clean["macro_f1"], "shifted_macro_f1": shifted["macro_f1"], "ece": clean["ece"],
        "parameters": size["parameters"], "gflops_per_image": size["flops_per_image"] / 1e9,
        "image_size": record["model_kwargs"]["image_size"], "epochs": len(history),
        "train_seconds": history[-1]["seconds"] if history else None,
        "hardware": record.get("hardware", "not recorded"),
    }


def workdir_rows(workdir: str, splits: list[str], shift: float = 0.03, checkpoint: str = "last",
                 records: str | None = None, log=lambda message: None) -> list[dict]:
    """The rows of a trained workdir, one per split, measured now; with `records`, its records are
    kept in records/<the workdir's name>."""
    reports = evaluate_run(workdir, splits, shift, checkpoint, log)
    if records:
        save_records(workdir, reports, os.path.join(records, os.path.basename(os.path.normpath(workdir))))
    record, history = read_config(workdir), read_history(workdir)
    return [row(record, history, s, reports[evaluation_file(s)], reports[evaluation_file(s, shift)], workdir)
            for s in splits]


def records_row(folder: str, split: str = "val", shift: float = 0.03) -> dict:
    """The row of a records folder on one split, from its stored reports."""
    record, history, clean, shifted = read_records(folder, split, shift)
    return row(record, history, split, clean, shifted, folder)


def format_table(rows: list[dict]) -> str:
    shifts = sorted({r["shift"] for r in rows})
    shift = f" {shifts[0]:g}" if len(shifts) == 1 else ""
    head = (f"| model (recipe, seed) | paper acc. | split | acc. clean | acc. HED shift{shift} | macro F1 | ECE "
            "| params | GFLOPs/img | px | epochs | train time | hardware |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 8 + "---|" * 2]
    for r in rows:
        minutes = f"{r['train_seconds'] / 60:.1f} min" if r["train_seconds"] is not None else "-"
        shifted = f"{r['shifted_accuracy']:.4f}" + ("" if shift else f" ({r['shift']:g})")
        lines.append(f"| {r['name']} | {r['paper_accuracy']} | {r['split']} ({r['examples']}) | {r['accuracy']:.4f} "
                     f"| {shifted} | {r['macro_f1']:.4f} | {r['ece']:.4f} | {r['parameters']:,} "
                     f"| {r['gflops_per_image']:.3f} | {r['image_size']} | {r['epochs']} | {minutes} "
                     f"| {r['hardware']} |")
    return "\n".join(lines)
