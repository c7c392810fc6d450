"""The paper's Table I, measured: one row per trained workdir.

    jaxcell table --workdir runs/cpu --workdir runs/brin --split val --shift 0.03 [--markdown FILE]

A row holds the paper's reported accuracy for the architecture, ours on clean images and on
stain-shifted copies (HED jitter, fixed seed), macro F1, expected calibration error (before
temperature scaling), parameters, forward FLOPs per image, training time and the hardware the
run trained on. Everything is recomputed from the workdir; nothing is copied from a log.
"""

from __future__ import annotations

from jaxcell.evaluate import Datasets, run_evaluation
from jaxcell.summary import summarize
from jaxcell.train import read_config, read_history

# Accuracy reported by the paper ("Multiclass Cancer Classification Using Deep Learning
# Architecture") for the architectures it trains; the others come from its literature review.
PAPER_ACCURACY = {"lightnetcell": "0.91", "brin": "0.99", "hybrid_vit": "> 0.98"}


def table_row(workdir: str, split: str = "val", shift: float = 0.03, checkpoint: str = "last",
              log=lambda message: None) -> dict:
    record = read_config(workdir)
    datasets = Datasets(None)  # the clean and the shifted evaluation share one load of the data
    clean = run_evaluation([workdir], checkpoint=checkpoint, split=split, calibrate=False, resamples=0,
                           datasets=datasets, log=log).result
    shifted = run_evaluation([workdir], checkpoint=checkpoint, split=split, shift=shift, calibrate=False,
                             resamples=0, datasets=datasets, log=log).result
    kwargs = {k: v for k, v in record["model_kwargs"].items() if k not in ("num_classes", "image_size")}
    size = summarize(record["model"], record["model_kwargs"]["image_size"],
                     record["model_kwargs"]["num_classes"], **kwargs)
    history = read_history(workdir)
    train = record["train"]
    return {
        "model": record["model"], "recipe": train.get("recipe"), "workdir": workdir,
        "paper_accuracy": PAPER_ACCURACY.get(record["model"], "-"),
        "split": split, "examples": clean["num_examples"], "checkpoint_step": clean["members"][0]["checkpoint_step"],
        "accuracy": clean["accuracy"], "shifted_accuracy": shifted["accuracy"], "shift": shift,
        "macro_f1": clean["macro_f1"], "shifted_macro_f1": shifted["macro_f1"], "ece": clean["ece"],
        "parameters": size["parameters"], "gflops_per_image": size["flops_per_image"] / 1e9,
        "image_size": record["model_kwargs"]["image_size"], "epochs": len(history),
        "train_seconds": history[-1]["seconds"] if history else None,
        "hardware": record.get("hardware", "not recorded"),
    }


def format_table(rows: list[dict]) -> str:
    head = ("| model (recipe) | paper acc. | acc. clean | acc. HED shift | macro F1 | ECE | params | GFLOPs/img "
            "| px | epochs | train time | hardware |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = r["model"] + (f" ({r['recipe']})" if r["recipe"] else "")
        minutes = f"{r['train_seconds'] / 60:.1f} min" if r["train_seconds"] is not None else "-"
        lines.append(f"| {name} | {r['paper_accuracy']} | {r['accuracy']:.4f} | {r['shifted_accuracy']:.4f} "
                     f"({r['shift']}) | {r['macro_f1']:.4f} | {r['ece']:.4f} | {r['parameters']:,} "
                     f"| {r['gflops_per_image']:.2f} | {r['image_size']} | {r['epochs']} | {minutes} "
                     f"| {r['hardware']} |")
    return "\n".join(lines)
