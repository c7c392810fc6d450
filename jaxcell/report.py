"""`jaxcell report`: one self-contained HTML page about a trained model, for readers who will
not run code: the metrics with their uncertainty, the confusion matrix, ROC curves, a
reliability diagram, the training curves, Grad-CAM maps of right and wrong cases and, when the run
has an out-of-distribution detector, the distribution of its scores (jaxcell.ood).

Every figure is a PNG embedded as base64 (the page needs no other file and no network) and is
also written beside the HTML as <stem>_<figure>.png. Plots use matplotlib's object API with the
Agg canvas (no pyplot global state, no display).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os

import numpy as np

from jaxcell import calibration
from jaxcell.evaluate import Evaluation, roc_curve

FIGURE_DPI = 100


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


def confusion_figure(cm: np.ndarray, names: list[str]):
    cm = np.asarray(cm)
    rows = np.maximum(cm.sum(1, keepdims=True), 1)
    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot()
    ax.imshow(cm / rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            share = cm[i, j] / rows[i, 0]
            ax.text(j, i, f"{cm[i, j]}\n{share:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if share > 0.6 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (colour: share of the row)")
    return fig


def roc_figure(labels: np.ndarray, probabilities: np.ndarray, names: list[str], auc: dict):
    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        positive = labels == i
        if positive.all() or not positive.any():
            continue
        fpr, tpr = roc_curve(probabilities[:, i], positive)
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc['per_class'][name]:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, each class against the rest")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def reliability_figure(labels: np.ndarray, probabilities: np.ndarray, calibrated: np.ndarray | None):
    curves = [("as trained", probabilities)] + ([("temperature-scaled", calibrated)] if calibrated is not None else [])
    fig = _figure(4.6 * len(curves), 4.0)
    for k, (title, p) in enumerate(curves):
        ax = fig.add_subplot(1, len(curves), k + 1)
        r = calibration.reliability(p, labels)
        edges = np.asarray(r["edges"])
        acc = np.nan_to_num(np.asarray(r["accuracy"], float))
        width = edges[1] - edges[0]
        ax.bar(edges[:-1], acc, width=width, align="edge", color="#4c72b0", edgecolor="white", label="accuracy")
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="perfect calibration")
        conf = np.asarray(r["confidence"], float)
        shown = np.asarray(r["count"]) > 0
        ax.plot(conf[shown], acc[shown], "o", color="#dd8452", ms=4, label="mean confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}: ECE {calibration.ece(p, labels):.3f}")
        ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    return fig


def training_figure(history: list[dict]):
    epochs = [h["epoch"] for h in history]
    fig = _figure(9.2, 3.6)
    for k, metric in enumerate(("loss", "accuracy")):
        ax = fig.add_subplot(1, 2, k + 1)
        for split in ("train", "val"):
            values = [h.get(f"{split}_{metric}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], "o-", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(metric)
        ax.legend(fontsize=8)
    return fig


def gallery_figure(tiles: list[dict], title: str):
    """tiles: {"image": uint8 HWC, "overlay": uint8 HWC, "caption": str}; two columns per case."""
    per_row = 4
    rows = -(-len(tiles) // per_row)
    fig = _figure(2.2 * 2 * min(per_row, len(tiles)), 2.5 * rows)
    fig.suptitle(title)
    grid = fig.add_gridspec(rows, 2 * min(per_row, len(tiles)))
    for k, tile in enumerate(tiles):
        r, c = divmod(k, per_row)
        for j, key in enumerate(("image", "overlay")):
            ax = fig.add_subplot(grid[r, 2 * c + j])
            ax.imshow(tile[key])
            ax.set_axis_off()
            if j == 0:
                ax.set_title(tile["caption"], fontsize=8, loc="left")
    return fig


def pick_cases(labels: np.ndarray, probabilities: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """Right cases with the highest confidence and wrong ones with the highest confidence (the
    errors a reader most needs to see), at most `count` each."""
    predictions = probabilities.argmax(-1)
    confidence = probabilities.max(-1)
    out = {}
    for key, mask in (("right", predictions == labels), ("wrong", predictions != labels)):
        idx = np.flatnonzero(mask)
        out[key] = idx[np.argsort(-confidence[idx], kind="stable")][:count]
    return out


def gradcam_tiles(evaluation: Evaluation, indices: np.ndarray, batch: int = 16) -> list[dict]:
    """Grad-CAM of the first member's model for the chosen images, explaining its prediction."""
    from jaxcell import models
    from jaxcell.explain import gradcam, overlay
    from jaxcell.train import prepare

    member = evaluation.members[0]
    record = member.record
    model = models.create(record["model"], **record["model_kwargs"])
    variables = {"params": member.state.params, "batch_stats": member.state.batch_stats}
    names = record["class_names"]
    tiles = []
    for start in range(0, len(indices), batch):
        idx = indices[start:start + batch]
        images = evaluation.images[idx]
        cam = gradcam(model, variables, prepare(images, record["preprocessing"]))
        for k, i in enumerate(idx):
            p = evaluation.probabilities[i]
            name = os.path.basename(evaluation.files[i]) if evaluation.files else f"#{i}"
            caption = (f"{name[:22]}\ntrue {names[evaluation.labels[i]]}, "
                       f"pred {names[int(p.argmax())]} {p.max():.2f}")
            tiles.append({"image": images[k], "overlay": overlay(images[k], cam.maps[k]), "caption": caption})
    return tiles


def ood_figure(inside: np.ndarray, foreign: np.ndarray | None, threshold: float, method: str):
    """Histograms of the detector's score: the evaluated images, the foreign ones, the threshold."""
    fig = _figure(6.4, 3.4)
    ax = fig.add_subplot()
    values = [inside] + ([foreign] if foreign is not None and len(foreign) else [])
    lo, hi = min(v.min() for v in values), max(v.max() for v in values)
    lo, hi = min(lo, threshold), max(hi, threshold)
    bins = np.linspace(lo, hi + 1e-9, 41)
    ax.hist(inside, bins, alpha=0.6, density=True, label=f"evaluated images ({len(inside)})")
    if len(values) > 1:
        ax.hist(foreign, bins, alpha=0.6, density=True, label=f"foreign images ({len(foreign)})")
    ax.axvline(threshold, color="k", linestyle="--", label="threshold (flagged to the right)")
    ax.set_xlabel(f"OOD score ({method}; higher = more foreign)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return fig


def _ood_rows(o: dict) -> list[list[str]]:
    d, inside = o["detector"], o["in_distribution"]
    rows = [["detector", f"{d['method']}, threshold {d['threshold']:.4g}"],
            ["fitted on", str(d.get("fitted_on", ""))],
            ["threshold set on", str(d.get("threshold_set_on", ""))],
            ["evaluated images flagged", f"{inside['flagged_share']:.2%} of {inside['images']}"],
            ["accuracy: all / accepted images", f"{_fmt(inside['accuracy'])} / {_fmt(inside['accuracy_accepted'])}"]]
    if "foreign" in o:
        f = o["foreign"]
        rows += [["foreign images flagged", f"{f['flagged_share']:.2%} of {f['images']} ({f['data']})"],
                 ["AUROC / FPR at 95% TPR", f"{o['auroc']:.4f} / {o['fpr_at_95_tpr']:.4f}"]]
    return rows


def _fmt(v, digits=4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def _metrics_rows(r: dict) -> list[tuple[str, str]]:
    b = r.get("bootstrap") or {}

    def interval(key):
        return f" (95% CI {b[key][0]:.4f} to {b[key][1]:.4f})" if key in b else ""

    rows = [("images", str(r["num_examples"])),
            ("accuracy", _fmt(r["accuracy"]) + interval("accuracy")),
            ("macro F1", _fmt(r["macro_f1"]) + interval("macro_f1")),
            ("weighted F1", _fmt(r["weighted_f1"])),
            ("macro ROC-AUC (one-vs-rest)", _fmt(r["roc_auc"]["macro"])),
            (f"ECE ({calibration.ECE_BINS} bins)", _fmt(r["ece"]))]
    if "ece_calibrated" in r:
        temps = ", ".join(f"{t:.3f}" for t in r["temperature"])
        rows.append((f"ECE after temperature scaling (T = {temps})", _fmt(r["ece_calibrated"])))
    elif r.get("calibration_note"):
        rows.append(("temperature scaling", r["calibration_note"]))
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;display:block;margin:.5em 0}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}figure{margin:1em 0}"""


def faithfulness_section(evaluation: Evaluation, count: int) -> tuple[object, str]:
    """Deletion/insertion curves of every explanation method on the first `count` images of the
    evaluated split (jaxcell.faithfulness): (figure, HTML table)."""
    from jaxcell import faithfulness, models
    from jaxcell.train import prepare

    member = evaluation.members[0]
    record = member.record
    model = models.create(record["model"], **record["model_kwargs"])
    variables = {"params": member.state.params, "batch_stats": member.state.batch_stats}
    x = prepare(evaluation.images[:count], record["preprocessing"])
    result = faithfulness.measure(model, variables, x)
    table = _table(["method", "deletion AUC (lower: more faithful)", "insertion AUC (higher: more faithful)"],
                   faithfulness.table_rows(result))
    note = (f"<p>On the first {len(x)} images of the evaluated split: pixels removed (set to the zero model "
            "input) or inserted in the order each method ranks them, most attributed first; random: a random "
            "order. An explanation that points at what the model uses drops the probability faster than "
            "random.</p>")
    return faithfulness.curves_figure(result), note + table


def write_report(evaluation: Evaluation, out: str, history: list[dict] | None = None, cams: int = 8,
                 ood=None, faithfulness: int = 0) -> list[str]:
    """Write the HTML page and its PNG figures; returns the paths written (HTML first). ood: a
    jaxcell.ood.Measurement of the evaluated images (and foreign ones), or None. faithfulness:
    images for the explanation methods' deletion/insertion section (0: none)."""
    r = evaluation.result
    names = r["class_names"]
    labels, probs = evaluation.labels, evaluation.probabilities
    if history is None:
        from jaxcell.train import read_history  # jax stays unimported until a report needs it

        history = read_history(evaluation.members[0].workdir)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    stem = os.path.splitext(out)[0]

    figures: list[tuple[str, str, object]] = [
        ("confusion", "Confusion matrix", confusion_figure(np.asarray(r["confusion_matrix"]), names)),
        ("roc", "ROC curves", roc_figure(labels, probs, names, r["roc_auc"])),
        ("reliability", "Reliability diagram", reliability_figure(labels, probs, evaluation.calibrated)),
    ]
    if history:
        figures.append(("training", "Training curves", training_figure(history)))
    if ood is not None:
        figures.append(("ood", "Out-of-distribution scores", ood_figure(ood.inside, ood.foreign, ood.threshold,
                                                                         ood.result["detector"]["method"])))
    notes = []
    if cams:
        cases = pick_cases(labels, probs, cams)
        for key, title in (("right", "Grad-CAM: correct predictions, most confident first"),
                           ("wrong", "Grad-CAM: errors, most confident first")):
            if len(cases[key]):
                figures.append((f"gradcam_{key}", title, gallery_figure(gradcam_tiles(evaluation, cases[key]), title)))
            else:
                notes.append(f"No {'correct' if key == 'right' else 'wrong'} predictions to show.")

    extra = {}
    if faithfulness:
        title = "Explanations: deletion and insertion curves"
        fig, extra["faithfulness"] = faithfulness_section(evaluation, faithfulness)
        figures.append(("faithfulness", title, fig))
    written, sections = [out], []
    for key, title, fig in figures:
        data = _png(fig)
        path = f"{stem}_{key}.png"
        with open(path, "wb") as f:
            f.write(data)
        written.append(path)
        sections.append(f'<figure><h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
                        f'src="data:image/png;base64,{base64.b64encode(data).decode()}"></figure>'
                        + extra.get(key, ""))

    member_rows = [[m["model"], m["workdir"], str(m["checkpoint_step"]), str(m["image_size"])] for m in r["members"]]
    per_class = [[n, _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), str(c["support"]),
                  _fmt(r["roc_auc"]["per_class"][n])] for n, c in r["per_class"].items()]
    conditions = []
    if r.get("tta"):
        conditions.append("test-time augmentation: probabilities averaged over the 8 flips and rotations")
    if r.get("stain_shift"):
        conditions.append(f"images stain-shifted in HED space (strength {r['stain_shift']['strength']}, "
                          f"seed {r['stain_shift']['seed']}) before prediction")
    caveats = [r.get("split_note") or "",
               "The dataset has no patient identifiers: images of one patient may fall in both training and "
               "test data, so these figures may be optimistic for new patients.",
               "Colour alone nearly separates the classes in this dataset; accuracy on stain-shifted copies "
               "(jaxcell evaluate --stain-shift 0.03) shows whether the model relies on it."]
    body = [
        f"<h1>jaxcell report: {html.escape(r['model'])}</h1>",
        f"<p>Evaluated on {html.escape(r['data'])}; written {datetime.datetime.now():%Y-%m-%d %H:%M}.</p>",
        _table(["model", "workdir", "checkpoint step", "image size"], member_rows),
        *(f"<p>{html.escape(c)}</p>" for c in conditions),
        "".join(f'<p class="note">{html.escape(c)}</p>' for c in caveats if c),
        "<h2>Metrics</h2>", _table(["metric", "value"], [list(row) for row in _metrics_rows(r)]),
        "<h2>Per class</h2>", _table(["class", "precision", "recall", "F1", "support", "ROC-AUC"], per_class),
        *(["<h2>Out-of-distribution detection</h2>", _table(["", "value"], _ood_rows(ood.result))] if ood else []),
        *sections,
        *(f"<p>{html.escape(n)}</p>" for n in notes),
    ]
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>jaxcell report: "
            f"{html.escape(r['model'])}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return written
