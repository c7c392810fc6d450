"""Classification metrics and the evaluation report.

The metrics are plain numpy (no framework needed): accuracy, per-class precision / recall / F1,
macro and weighted F1, one-vs-rest ROC-AUC per class (rank-based, ties counted half), expected
calibration error before and after temperature scaling (jaxcell.calibration) and bootstrap 95%
intervals. The evaluation pipeline at the end of the file (restore one or more workdirs, load
the images each needs, optional stain shift and test-time augmentation, temperature) imports
jax and the trainer only when called.
"""

import dataclasses
import functools
import os

import numpy as np

from jaxcell import calibration
from jaxcell.errors import UserError

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (np.asarray(labels), np.asarray(predictions)), 1)
    return m


def report(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    labels = np.asarray(labels)
    predictions = np.asarray(probabilities).argmax(-1)
    cm = confusion_matrix(labels, predictions, len(class_names))
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0)
    present = support > 0  # a class absent from the labels has no defined recall: leave it out of the mean
    return {
        "num_examples": int(len(labels)),
        "accuracy": float((predictions == labels).mean()) if len(labels) else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() else float("nan"),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }


def format_report(result: dict) -> str:
    names = result["class_names"]
    width = max(len(n) for n in names + ["class"])
    lines = [f"{result['num_examples']} images   accuracy {result['accuracy']:.4f}   "
             f"macro F1 {result['macro_f1']:.4f}", "",
             f"{'class':<{width}}  precision  recall     f1  support"]
    for name in names:
        c = result["per_class"][name]
        lines.append(f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:5.4f}  {c['support']:7d}")
    lines += ["", "confusion matrix (rows true, columns predicted)",
              " " * (width + 2) + " ".join(f"{n[:6]:>6}" for n in names)]
    for name, row in zip(names, result["confusion_matrix"]):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:6d}" for v in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Ranking, calibration and uncertainty.

def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0                 # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + P(tie) / 2
    (the Mann-Whitney statistic). NaN when either class is empty."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores, positive = np.asarray(scores), np.asarray(positive, bool)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(p)[last_of_tie], np.cumsum(~p)[last_of_tie]
    tpr = np.r_[0, tp] / max(p.sum(), 1)
    fpr = np.r_[0, fp] / max((~p).sum(), 1)
    return fpr, tpr


def one_vs_rest_auc(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict:
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    per_class = {name: roc_auc(probabilities[:, i], labels == i) for i, name in enumerate(class_names)}
    defined = [v for v in per_class.values() if not np.isnan(v)]
    return {"per_class": {k: (None if np.isnan(v) else v) for k, v in per_class.items()},
            "macro": float(np.mean(defined)) if defined else None}


def _batched_scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """Accuracy and macro F1 of every row of (B, N) label / prediction arrays at once."""
    b = labels.shape[0]
    flat = (np.arange(b)[:, None] * num_classes + labels) * num_classes + predictions
    cm = np.bincount(flat.ravel(), minlength=b * num_classes ** 2).reshape(b, num_classes, num_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    support, predicted = cm.sum(2), cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)  # = 2PR / (P + R)
    present = support > 0
    return {"accuracy": tp.sum(1) / labels.shape[1],
            "macro_f1": (f1 * present).sum(1) / np.maximum(present.sum(1), 1)}


def bootstrap_intervals(labels: np.ndarray, probabilities: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals for accuracy and macro F1: images drawn with replacement.

    The images are the unit of resampling; with no patient ids, images of one patient count as
    independent and the intervals are too narrow by however much such images resemble each other.
    """
    labels = np.asarray(labels)
    predictions = np.asarray(probabilities).argmax(-1)
    n, k = len(labels), np.asarray(probabilities).shape[-1]
    if n == 0:
        return {}
    rng = np.random.default_rng(seed)
    scores = {"accuracy": [], "macro_f1": []}
    for start in range(0, resamples, 100):  # 100 resamples at a time bounds the memory
        idx = rng.integers(0, n, (min(100, resamples - start), n))
        for key, value in _batched_scores(labels[idx], predictions[idx], k).items():
            scores[key].append(value)
    tail = (1 - level) / 2 * 100
    out = {key: [float(v) for v in np.percentile(np.concatenate(vals), [tail, 100 - tail])]
           for key, vals in scores.items()}
    return {**out, "level": level, "resamples": resamples, "seed": seed}


def evaluation_metrics(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str],
                       calibrated: np.ndarray | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> dict:
    """`report` plus ROC-AUC, ECE (and ECE after temperature scaling when `calibrated` is given)
    and bootstrap intervals. The classification metrics are those of `probabilities` (the
    temperature changes no argmax)."""
    out = report(labels, probabilities, class_names)
    out["roc_auc"] = one_vs_rest_auc(labels, probabilities, class_names)
    out["ece"] = calibration.ece(probabilities, labels)
    out["nll"] = calibration.nll(probabilities, labels) if len(labels) else float("nan")
    if calibrated is not None:
        out["ece_calibrated"] = calibration.ece(calibrated, labels)
        out["nll_calibrated"] = calibration.nll(calibrated, labels) if len(labels) else float("nan")
    out["bootstrap"] = bootstrap_intervals(labels, probabilities, resamples, seed) if resamples else {}
    return out


def _fmt(v, digits=4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def format_evaluation(result: dict) -> str:
    """`format_report` and the lines for the added metrics."""
    lines = [format_report(result), ""]
    b = result.get("bootstrap") or {}
    if b:
        pct = round(b["level"] * 100)
        lines.append(f"{pct}% bootstrap intervals ({b['resamples']} resamples of the images, seed {b['seed']}): "
                     f"accuracy [{b['accuracy'][0]:.4f}, {b['accuracy'][1]:.4f}]   "
                     f"macro F1 [{b['macro_f1'][0]:.4f}, {b['macro_f1'][1]:.4f}]")
    lines.append(f"weighted F1 {_fmt(result['weighted_f1'])}")
    auc = result.get("roc_auc")
    if auc:
        lines.append("ROC-AUC one-vs-rest: " + "  ".join(f"{k} {_fmt(v)}" for k, v in auc["per_class"].items())
                     + f"   macro {_fmt(auc['macro'])}")
    if "ece" in result:
        line = f"calibration (ECE, {calibration.ECE_BINS} bins): {_fmt(result['ece'])}"
        if "ece_calibrated" in result:
            temps = ", ".join(f"{t:.3f}" for t in result.get("temperature", []))
            line += f"; after temperature scaling (T = {temps}) {_fmt(result['ece_calibrated'])}"
        elif result.get("calibration_note"):
            line += f"; {result['calibration_note']}"
        lines.append(line)
    if result.get("split_note"):
        lines.append(result["split_note"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The evaluation pipeline: restore, load, (stain shift), predict (TTA), calibrate, measure.

DIHEDRAL = 8


def dihedral_views(images: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square (rotations by 0, 90, 180, 270 degrees, each with and
    without a left-right flip) of NHWC images."""
    flipped = images[:, :, ::-1]
    return [np.ascontiguousarray(np.rot90(x, k, axes=(1, 2))) for x in (images, flipped) for k in range(4)]


def stain_shift(images: np.ndarray, strength: float, seed: int = 0, chunk: int = 64,
                indices: np.ndarray | None = None) -> np.ndarray:
    """uint8 NHWC -> stain-shifted uint8 copies: HED jitter of `strength`, a fixed draw per image
    index i (jax.random.fold_in(key(seed), i); i = position, or indices[position]), so a copy
    does not depend on batching or image size."""
    import jax.numpy as jnp

    indices = np.arange(len(images)) if indices is None else np.asarray(indices)
    shift = _shift_batch()
    out = np.empty_like(images)
    for start in range(0, len(images), chunk):
        y = shift(jnp.asarray(images[start:start + chunk]), jnp.asarray(indices[start:start + chunk], jnp.uint32),
                  jnp.uint32(seed), jnp.float32(strength))
        out[start:start + chunk] = np.asarray(y)
    return out


@functools.cache
def _shift_batch():
    """The jitted batch function of stain_shift (built once: seed and strength are traced)."""
    import jax
    import jax.numpy as jnp

    from jaxcell.data.augment import hed_jitter

    @jax.jit
    def shift(images, indices, seed, strength):
        key = jax.random.key(seed)
        x = images.astype(jnp.float32) / 255.0
        y = jax.vmap(lambda img, i: hed_jitter(img[None], jax.random.fold_in(key, i), strength)[0])(x, indices)
        return jnp.clip(jnp.round(y * 255.0), 0, 255).astype(jnp.uint8)

    return shift


@dataclasses.dataclass
class Member:
    """One restored workdir."""

    workdir: str
    state: object
    record: dict
    eval_step: object
    placement: object

    @property
    def image_size(self) -> int:
        return int(self.record["preprocessing"]["image_size"])

    @property
    def step(self) -> int:
        from jaxcell.train import local

        return int(local(self.state.step))


def restore(workdir: str, checkpoint="best", model: str | None = None) -> Member:
    from jaxcell.train import read_config, restore_for_inference

    record = read_config(workdir)
    if model and model != record["model"]:
        raise UserError(f"{workdir} holds a {record['model']!r} model, not {model!r}")
    which = int(checkpoint) if str(checkpoint).isdigit() else checkpoint
    if which not in ("best", "last") and not isinstance(which, int):
        raise UserError(f"--checkpoint must be best, last or a step number, not {checkpoint!r}")
    state, record, eval_step, placement = restore_for_inference(workdir, which)
    return Member(workdir, state, record, eval_step, placement)


def predict_views(member: Member, images: np.ndarray, tta: bool = False, batch_size: int = 64) -> np.ndarray:
    """Logits (V, N, K): V = 8 dihedral views with tta, else 1."""
    from jaxcell.train import predict_logits

    views = dihedral_views(images) if tta else [images]
    return np.stack([predict_logits(member.eval_step, member.state, v, batch_size, member.placement)
                     for v in views]).astype(np.float64)


class Datasets:
    """Each workdir's own data set, loaded once per (source, size, split seed, examples); pass one
    to several run_evaluation calls to load it once for all of them."""

    def __init__(self, cache_dir: str | None):
        self.cache_dir, self.loaded = cache_dir, {}

    def get(self, member: Member):
        from jaxcell import data

        t = member.record["train"]
        seed = data.split_seed(t)
        key = (t["data"], member.image_size, seed, t["synthetic_examples"])
        if key not in self.loaded:
            self.loaded[key] = data.load(t["data"], member.image_size, seed=seed,
                                         synthetic_examples=t["synthetic_examples"], cache_dir=self.cache_dir)
        return self.loaded[key]


def temperature(member: Member, datasets: Datasets, tta: bool, batch_size: int, refit: bool) -> dict:
    """The member's temperature entry from calibration.json, fitted on its validation split
    (clean images) and stored when absent or when refit is asked for."""
    if not refit:
        entry = calibration.read_temperature(member.workdir, member.step, tta)
        if entry is not None:
            return entry
    images, labels = datasets.get(member).splits.get("val", (None, None))
    if labels is None or len(labels) == 0:
        raise UserError(f"{member.workdir}: its data has no validation split to fit a temperature on")
    logits = predict_views(member, images, tta, batch_size)
    t = calibration.fit_temperature(logits, labels)
    entry = {"temperature": t, "checkpoint_step": member.step, "tta": tta, "fitted_on": "val split",
             # At the upper edge of the search range the NLL still falls beyond it (a model near
             # chance); at the lower edge fit_temperature keeps T = 1 instead.
             "at_search_limit": bool(abs(np.log(t) - calibration.LOG_T_RANGE[1]) < 1e-3),
             "num_examples": int(len(labels)),
             "nll_before": calibration.nll(calibration.probabilities(logits), labels),
             "nll_after": calibration.nll(calibration.probabilities(logits, t), labels)}
    calibration.write_temperature(member.workdir, member.step, tta, entry)
    return entry


@dataclasses.dataclass
class Evaluation:
    result: dict                      # everything `format_evaluation` prints, JSON-ready
    labels: np.ndarray
    probabilities: np.ndarray         # (N, K), uncalibrated, averaged over members and views
    calibrated: np.ndarray | None     # the same after each member's temperature
    images: np.ndarray                # the first member's input images (stain-shifted if asked)
    files: list[str] | None           # with --data: the image files, in order
    members: list[Member]


def _check_ensemble(members: list[Member], folder: str | None) -> None:
    from jaxcell.data import split_seed

    first = members[0]
    for m in members[1:]:
        if m.record["class_names"] != first.record["class_names"]:
            raise UserError(f"{m.workdir} predicts classes {m.record['class_names']}, {first.workdir} "
                            f"{first.record['class_names']}: an ensemble needs the same classes in the same order")
        if folder is None:
            a, b = first.record["train"], m.record["train"]
            for key, x, y in (("data", a["data"], b["data"]), ("split seed", split_seed(a), split_seed(b)),
                              ("synthetic_examples", a["synthetic_examples"], b["synthetic_examples"])):
                if x != y:
                    raise UserError(f"{m.workdir} and {first.workdir} were trained on different splits "
                                    f"({key}: {y!r} vs {x!r}); evaluate the ensemble on a folder with --data")


def run_evaluation(workdirs: list[str], *, checkpoint="best", model: str | None = None, data_dir: str | None = None,
                   split: str = "test", tta: bool = False, shift: float = 0.0, shift_seed: int = 0,
                   calibrate: bool = True, refit_temperature: bool = False, batch_size: int = 64,
                   cache_dir: str | None = None, resamples: int = BOOTSTRAP_RESAMPLES,
                   datasets: Datasets | None = None, log=lambda message: None) -> Evaluation:
    """Evaluate one workdir or an ensemble (probabilities averaged) on a split or a folder."""
    from jaxcell import data

    members = [restore(w, checkpoint, model) for w in workdirs]
    _check_ensemble(members, data_dir)
    names = members[0].record["class_names"]
    datasets = datasets if datasets is not None else Datasets(cache_dir)
    labels = files = first_images = source = None
    raw, scaled, temps, note = [], [], [], ""
    for m in members:
        if data_dir:
            images, y, paths, _ = data.load_folder_all(data_dir, m.image_size, class_names=names)
            source = source or f"every image in {data_dir}"
        else:
            ds = datasets.get(m)
            if split not in ds.splits:
                raise UserError(f"{m.workdir}: its data has no {split!r} split (it has {', '.join(ds.splits)})")
            images, y = ds.splits[split]
            paths, source = None, source or f"the {split} split of {ds.source}"
        y = np.asarray(y)
        if labels is None:
            labels, files = y, paths
        elif not np.array_equal(labels, y):
            raise UserError(f"{m.workdir} sees other images or labels than {members[0].workdir}")
        if shift:
            log(f"stain-shifting {len(y)} images (HED strength {shift}, seed {shift_seed})")
            images = stain_shift(images, shift, shift_seed)
        if first_images is None:
            first_images = images
        logits = predict_views(m, images, tta, batch_size)
        raw.append(calibration.probabilities(logits))
        if calibrate and not note:
            try:
                entry = temperature(m, datasets, tta, batch_size, refit_temperature)
                temps.append(entry["temperature"])
                scaled.append(calibration.probabilities(logits, entry["temperature"]))
            except UserError as error:  # a folder evaluation whose training data has gone: say so, go on
                note = f"no temperature scaling ({error})"
    probabilities = np.mean(raw, axis=0)
    calibrated = np.mean(scaled, axis=0) if calibrate and not note else None
    result = {
        "model": "+".join(m.record["model"] for m in members),
        "workdir": os.path.abspath(members[0].workdir),
        "members": [{"workdir": os.path.abspath(m.workdir), "model": m.record["model"], "checkpoint_step": m.step,
                     "image_size": m.image_size} for m in members],
        "data": source,
        "split_note": "" if data_dir else members[0].record["data"]["split_note"],
        "tta": tta,
        "stain_shift": {"strength": shift, "seed": shift_seed} if shift else None,
        **evaluation_metrics(labels, probabilities, names, calibrated, resamples),
    }
    if calibrated is not None:
        result["temperature"] = temps
    elif note:
        result["calibration_note"] = note
    return Evaluation(result, labels, probabilities, calibrated, first_images, files, members)
