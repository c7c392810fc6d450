"""The OOD table: every candidate score of jaxcell.ood, fitted several ways, on the foreign sets.

    python -m jaxcell.foreign_sets --workdir RUN --out FOREIGN
    .venv/bin/python bench/ood_table.py --workdir RUN --foreign FOREIGN --json out.json [--markdown out.md]

Features are extracted once (cached in --cache as .npz) and every (fit, score) pair is measured on them:
the threshold flags at most 2% of the clean validation split; the in-distribution side is the test split,
clean and stain-shifted as `jaxcell evaluate --stain-shift 0.03` shifts it (seed 0); AUROC and FPR at 95%
TPR are those of each foreign set against the clean test split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from jaxcell.foreign_sets import PER_IMAGE


def extract_all(workdir: str, foreign: str, views: int, cache: str | None, batch_size: int = 64) -> dict:
    if cache and os.path.isfile(cache):
        with np.load(cache, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    from jaxcell import evaluate, ood
    from jaxcell.train import TrainConfig, augmentation

    member = evaluate.restore(workdir)
    ds = evaluate.Datasets(None).get(member)
    extract = ood.extractor_for(member, batch_size)
    out = {}

    def put(name, images, **kw):
        t = time.perf_counter()
        f, z = extract(images, **kw)
        out[f"{name}/f"], out[f"{name}/z"] = f, z
        print(f"{name}: {len(images)} images in {time.perf_counter() - t:.1f}s", flush=True)

    train_images, out["train/y"] = ds.splits["train"]
    put("train", train_images)
    augment = augmentation(TrainConfig(**member.record["train"]))
    for v in range(views):
        put(f"train_aug{v}", train_images, augment=augment, seed=v)
    for split in ("val", "test"):
        images, out[f"{split}/y"] = ds.splits[split]
        put(split, images)
        put(f"{split}_shift", evaluate.stain_shift(images, 0.03, 0))
    for name in sorted(os.listdir(foreign)):
        if os.path.isdir(os.path.join(foreign, name)):
            put(f"foreign_{name}", ood.foreign_images(os.path.join(foreign, name), member.image_size)[0])
    out["head/kernel"], out["head/bias"] = ood.head_weights(member)
    out["class_names"] = np.asarray(member.record["class_names"])
    out["checkpoint_step"] = np.asarray(member.step)
    out["block_names"] = np.asarray([n for n, _ in extract.blocks])
    out["block_widths"] = np.asarray([w for _, w in extract.blocks])
    if cache:
        np.savez(cache, **out)
    return out


def measure(d: dict, views: int, methods=None) -> list[dict]:
    from jaxcell import ood
    from jaxcell.evaluate import roc_auc

    names = list(d["class_names"])
    healthy = names.index("Benign")
    feats = [d["train/f"]] + [d[f"train_aug{v}/f"] for v in range(views)]
    det = ood.fit(np.concatenate(feats), np.tile(d["train/y"], len(feats)), d["val/f"], d["val/z"],
                  (d["head/kernel"], d["head/bias"]), len(names),
                  [(str(n), int(w)) for n, w in zip(d["block_names"], d["block_widths"])])
    rows = []
    sets = sorted(k[len("foreign_"):-2] for k in d if k.startswith("foreign_") and k.endswith("/f"))
    val = det.scores(d["val/f"], d["val/z"])
    for method in methods or ood.METHODS:
        det_m = det.with_method(method, val[method])
        score = lambda key: det_m.score(d[f"{key}/f"], d[f"{key}/z"])  # noqa: E731
        test, shifted = score("test"), score("test_shift")
        row = {"method": method, "views": views, "threshold": det_m.threshold,
               "val_flagged": float((val[method] > det_m.threshold).mean()),
               "test_flagged": float((test > det_m.threshold).mean()),
               "test_shift_flagged": float((shifted > det_m.threshold).mean()),
               "test_accuracy": float((d["test/z"].argmax(-1) == d["test/y"]).mean()),
               "test_accuracy_accepted": float((d["test/z"].argmax(-1) == d["test/y"])[test <= det_m.threshold].mean()),
               "test_shift_accuracy": float((d["test_shift/z"].argmax(-1) == d["test/y"]).mean()),
               "foreign": {}}
        for s in sets:
            b = score(f"foreign_{s}")
            both = np.r_[test, b]
            positive = np.r_[np.zeros(len(test), bool), np.ones(len(b), bool)]
            predicted = d[f"foreign_{s}/z"].argmax(-1)
            called = (predicted != healthy) & (b <= det_m.threshold)
            row["foreign"][s] = {"auroc": roc_auc(both, positive), "fpr95": ood.fpr_at_tpr(both, positive),
                                 "flagged": float((b > det_m.threshold).mean()),
                                 "leukemia_unflagged": float(called.mean()), "images": int(len(b)),
                                 # the model's accuracy on the set, where its images are the test images changed
                                 "model_accuracy": float((predicted == d["test/y"]).mean())
                                 if s in PER_IMAGE and len(b) == len(d["test/y"]) else None}
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    sets = list(rows[0]["foreign"])
    head = ("| score | fit views | val flagged | test flagged | stain-shifted flagged | "
            + " | ".join(f"{s} AUROC / FPR@95 / flagged" for s in sets) + " | min AUROC |")
    lines = [head, "|" + "---|" * (6 + len(sets))]
    for r in rows:
        cells = [f"{v['auroc']:.3f} / {v['fpr95']:.2f} / {v['flagged']:.0%}" for v in r["foreign"].values()]
        lines.append(f"| {r['method']} | {r['views']} | {r['val_flagged']:.1%} | {r['test_flagged']:.1%} | "
                     f"{r['test_shift_flagged']:.1%} | " + " | ".join(cells)
                     + f" | {min(v['auroc'] for v in r['foreign'].values()):.3f} |")
    return "\n".join(lines)


def chosen_table(row: dict) -> str:
    """One score and fit in detail: a line per foreign set, then the in-distribution side."""
    lines = [f"| set ({row['method']}, fitted with {row['views']} augmented copies) | images | AUROC | FPR@95 | "
             "flagged | called leukemia, not flagged | model accuracy on the set |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s, v in row["foreign"].items():
        acc = "-" if v["model_accuracy"] is None else f"{v['model_accuracy']:.3f}"
        lines.append(f"| {s} | {v['images']} | {v['auroc']:.3f} | {v['fpr95']:.3f} | {v['flagged']:.1%} | "
                     f"{v['leukemia_unflagged']:.1%} | {acc} |")
    lines.append(f"| own test split, clean | | | | {row['test_flagged']:.1%} | | {row['test_accuracy']:.3f} "
                 f"(accepted images: {row['test_accuracy_accepted']:.3f}) |")
    lines.append(f"| own test split, stain-shifted (HED 0.03) | | | | {row['test_shift_flagged']:.1%} | | "
                 f"{row['test_shift_accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--foreign", required=True, help="the folder python -m jaxcell.foreign_sets wrote")
    p.add_argument("--views", default="0,2,4", help="augmented copies of the training split to fit on, to compare")
    p.add_argument("--cache", help="an .npz to keep the features in (reused when it exists)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--chosen", default="combined", help="the score to detail in a second table")
    args = p.parse_args(argv)
    views = [int(v) for v in args.views.split(",")]
    d = extract_all(args.workdir, args.foreign, max(views), args.cache)
    rows = [r for v in views for r in measure(d, v)]
    table = markdown(rows)
    chosen = [r for r in rows if r["method"] == args.chosen]
    if chosen:  # the fit with the most augmented copies asked for
        table += "\n\n" + chosen_table(chosen[-1])
    print(table)
    print(f"test accuracy {rows[0]['test_accuracy']:.4f}, stain-shifted {rows[0]['test_shift_accuracy']:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workdir": os.path.abspath(args.workdir), "checkpoint_step": int(d["checkpoint_step"])
                       if "checkpoint_step" in d else None, "rows": rows}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
