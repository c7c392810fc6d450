"""Out-of-distribution detection: a post-hoc detector that says when an image is unlike the training images.

    detector = load(workdir)                                   # None when the run has none
    features, logits = detector_inputs(model, variables, images01, preprocessing)   # pure, jit-able
    # or, batched and compiled once: Extractor(model, variables, preprocessing)(uint8 images)
    detector.score(features, logits)          # (N,) numpy, higher = more foreign
    detector.score(features, logits) > detector.threshold   # flagged
    detector.describe()                       # method, threshold, what it was fitted on (model card)
    fit_workdir(workdir)                      # fit on the training split, threshold on validation, save

`features_and_logits(model, variables, x)` gives the penultimate features alone: the input of the last
dense layer of the model's head (the registry's `head` module: fc2, fc, classifier, head), read with
`nn.intercept_methods`, so one mechanism serves every model.

The features a detector scores (`detector_inputs`) are the penultimate ones followed by low-level
blocks: the input's optical density (mean and spread per channel) and the mean and spread over positions
of every top-level module's output (the same rule for every model).

Scores (all higher = more foreign; each is computed by every detector, `method` picks the one used):
  msp          1 - the largest softmax probability
  energy       -logsumexp(logits)
  mahalanobis  the smallest squared Mahalanobis distance of the penultimate features to a class mean
               (class-conditional Gaussians with one shared covariance, Lee et al. 2018)
  knn          distance to the k-th nearest training feature, features scaled to unit length (Sun et al. 2022)
  vim          ViM (Wang et al. 2022): the feature's norm outside the principal subspace, scaled to the
               logits, minus the logsumexp of the logits
  layers       the mean over the low-level blocks of each block's Mahalanobis distance to its one training
               Gaussian, each standardized by its median and interquartile range on the validation split
  combined     the mean of the standardized penultimate Mahalanobis distance and the standardized block
               distances of `layers`

The training features are those of the training split as it is and of copies under the trainer's own
augmentation (flips, rotations, stain and colour jitter): a stain shift the model is trained to ignore
then lies inside the fitted density instead of being called foreign. The threshold is the validation
split's (clean images) score quantile that flags at most `FLAG_SHARE` of them.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os

import numpy as np

from jaxcell.errors import UserError

OOD_ARRAYS = "ood.npz"
OOD_FILE = "ood.json"
FLAG_SHARE = 0.02             # at most this share of the clean validation images is flagged
METHODS = ("msp", "energy", "mahalanobis", "knn", "vim", "layers", "combined")
DEFAULT_METHOD = "combined"
KNN_K = 5
AUGMENTED_VIEWS = 2           # augmented copies of the training split the detector is fitted on
SHRINKAGE = 1e-3              # ridge on the shared covariance, a share of its mean variance


# ---------------------------------------------------------------------------------------------
# Features.

def head_name(model) -> str:
    """The registry's head module of a model instance (the module whose input is the penultimate feature)."""
    from jaxcell import models
    from jaxcell.explain import registered_name

    name = registered_name(model)
    if name is None:
        raise UserError(f"{type(model).__name__} is not a registered model; its head is unknown")
    return models.spec(name).head


def _forward(model, variables, x, head: str | None, layer_stats: bool):
    """(penultimate (N, D), [per top-level module: (mean, std) over positions], their paths, logits)."""
    import flax.linen as nn

    head = head or head_name(model)
    captured, stats, names = [], [], []

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            path = "/".join(context.module.path)
            if (path == head or path.startswith(head + "/")) and isinstance(context.module, nn.Dense):
                captured.append(args[0])
            elif layer_stats and len(context.module.path) == 1 and getattr(out, "ndim", 0) in (3, 4):
                axes = tuple(range(1, out.ndim - 1))
                stats.append((out.mean(axes), out.std(axes)))
                names.append(path)
        return out

    with nn.intercept_methods(capture):
        logits = model.apply(variables, x, train=False)
    if not captured:
        raise UserError(f"the model's head {head!r} has no dense layer to read the penultimate features from")
    return captured[-1].reshape(captured[-1].shape[0], -1), stats, names, logits


def features_and_logits(model, variables, x, head: str | None = None):
    """(penultimate features (N, D), logits (N, K)) of a preprocessed float NHWC batch, in eval mode.

    The penultimate features are the input of the last dense layer of the registry's head module (the
    head itself, or BRIN's fc after its pooling). Pure and jit-able: the call is intercepted to read
    its input; nothing else changes."""
    features, _, _, logits = _forward(model, variables, x, head, False)
    return features, logits


COLOUR_BLOCK = "input optical density"


def detector_inputs(model, variables, images, preprocessing: dict, head: str | None = None,
                    names: list | None = None):
    """What a Detector scores, for float images in [0, 1] (NHWC; uint8 / 255): (features, logits).

    features = [penultimate (D) | the images' optical density, mean and std per channel (6) | mean and
    std over positions of every top-level module's feature map or token sequence, in call order]. The
    later blocks are low-level statistics (colour, focus, scale, texture) that the penultimate features
    may be blind to; the optical density is read before the model's own preprocessing, which with
    --od-center removes its mean. Pure and jit-able. `names` (a list) receives each block's
    (name, width) while tracing."""
    import jax.numpy as jnp

    from jaxcell.train import standardize

    penultimate, stats, paths, logits = _forward(model, variables, standardize(images, preprocessing), head, True)
    od = -jnp.log(jnp.maximum(images, 1 / 255))
    blocks = [("penultimate", penultimate), (COLOUR_BLOCK, jnp.concatenate([od.mean((1, 2)), od.std((1, 2))], 1)),
              *((p, jnp.concatenate(m, 1)) for p, m in zip(paths, stats))]
    if names is not None:
        names.extend((name, int(b.shape[1])) for name, b in blocks)
    return jnp.concatenate([b.astype(jnp.float32) for _, b in blocks], axis=1), logits


class Extractor:
    """`detector_inputs` of uint8 images for one trained model: one compiled program, batches padded to one
    size; `augment` (the trainer's augmentation keywords) draws augmented copies first. `blocks`: the
    (name, width) of each feature block."""

    def __init__(self, model, variables, preprocessing: dict, batch_size: int = 64):
        import jax
        import jax.numpy as jnp

        from jaxcell import kernels
        from jaxcell.data.augment import augment as augment_images

        self.batch_size = batch_size
        self.variables = jax.device_get(variables)   # host copies: the program runs on the default device
        head = head_name(model)
        self.blocks = []

        def clean(variables, images):
            return detector_inputs(model, variables, images.astype(jnp.float32) / 255.0, preprocessing, head)

        def augmented(variables, images, key, kwargs):
            x = augment_images(images.astype(jnp.float32) / 255.0, key, **dict(kwargs))
            return detector_inputs(model, variables, x, preprocessing, head)

        size = preprocessing["image_size"]
        jax.eval_shape(lambda v, x: detector_inputs(model, v, x, preprocessing, head, self.blocks), self.variables,
                       jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
        choice = kernels.for_devices()
        self._clean = kernels.jit(clean, choice)
        self._augmented = kernels.jit(augmented, choice, static_argnums=3)

    def __call__(self, images: np.ndarray, augment: dict | None = None, seed: int = 0):
        """(features (N, F), logits (N, K)) as numpy float32."""
        import jax

        feats, logits = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            m = len(chunk)
            if m < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - m, *chunk.shape[1:]), chunk.dtype)])
            if augment is None:
                f, z = self._clean(self.variables, chunk)
            else:
                key = jax.random.fold_in(jax.random.key(seed), start)
                f, z = self._augmented(self.variables, chunk, key, tuple(sorted(augment.items())))
            feats.append(np.asarray(f, np.float32)[:m])
            logits.append(np.asarray(z, np.float32)[:m])
        width = sum(w for _, w in self.blocks)
        if not feats:
            return np.zeros((0, width), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(feats), np.concatenate(logits)

# ---------------------------------------------------------------------------------------------
# The scores (numpy).

@functools.cache
def _blas_threads():
    """threadpoolctl's handle on the BLAS numpy uses (made once: finding the libraries costs more than a score)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    top = z.max(-1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[:, 0]


def _unit(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, np.float64)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _whitening(centred: np.ndarray, dof: int) -> np.ndarray:
    """W with W W^T = the inverse of the covariance of `centred` rows (a small ridge keeps it finite)."""
    d = centred.shape[1]
    cov = centred.T @ centred / max(dof, 1)
    cov += SHRINKAGE * max(np.trace(cov) / d, 1e-12) * np.eye(d)
    evals, evecs = np.linalg.eigh(cov)
    return evecs / np.sqrt(np.maximum(evals, 1e-12))


def _distance2(f: np.ndarray, means: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """(N, M) squared Mahalanobis distances |W^T (f - mu_m)|^2."""
    fw, mw = f @ whiten, means @ whiten
    return np.maximum((fw ** 2).sum(1)[:, None] - 2 * fw @ mw.T + (mw ** 2).sum(1)[None], 0.0)


@dataclasses.dataclass
class Detector:
    method: str
    threshold: float
    arrays: dict                   # name -> np.ndarray (what ood.npz holds)
    info: dict                     # what it was fitted on, the feature blocks (ood.json)

    @property
    def widths(self) -> list[int]:
        return [int(w) for w in self.arrays["block_widths"]]

    def scores(self, features: np.ndarray, logits: np.ndarray, methods=METHODS) -> dict[str, np.ndarray]:
        """Each method's score, (N,) each (those of `methods`, computing only what they need). features:
        `detector_inputs`'s, logits the model's.

        On one BLAS thread: these products are small (a few hundred columns), and waking a second
        thread costs more than it saves; on a busy machine, ten times more (docs/benchmarks.md,
        "Serving under load"), which the server pays on every batch and `jaxcell predict` on each."""
        for method in methods:
            check_method(method)
        with _blas_threads().limit(limits=1, user_api="blas"):
            out = self._scores(features, logits, set(methods))
        return {m: out[m] for m in methods}

    def _scores(self, features: np.ndarray, logits: np.ndarray, want: set[str]) -> dict[str, np.ndarray]:
        a, widths = self.arrays, self.widths
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != sum(widths):
            raise UserError(f"the OOD detector takes {sum(widths)} features per image (jaxcell.ood.detector_inputs), "
                            f"got shape {f.shape}")
        edges = np.cumsum([0, *widths])
        blocks = [f[:, edges[i]:edges[i + 1]] for i in range(len(widths))]
        p = blocks[0]                                             # the penultimate features
        out = {}
        if want & {"msp", "energy", "vim"}:
            logits = np.asarray(logits, np.float64)
            lse = _logsumexp(logits)
            out["msp"], out["energy"] = 1.0 - np.exp(logits.max(-1) - lse), -lse
        if want & {"mahalanobis", "combined"}:
            out["mahalanobis"] = _distance2(p, a["means"], a["whiten"]).min(1)
        if "knn" in want:  # on unit vectors: |u - b|^2 = 2 - 2 u.b; the k-th smallest distance
            sim = _unit(p) @ a["bank"].T
            k = min(int(a["knn_k"]), sim.shape[1])
            kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
            out["knn"] = np.sqrt(np.maximum(2 - 2 * kth, 0.0))
        if "vim" in want:
            residual = np.linalg.norm((p - a["vim_origin"]) @ a["vim_residual"], axis=1)
            out["vim"] = float(a["vim_alpha"]) * residual - lse
        if want & {"layers", "combined"}:
            # Every later block: one Gaussian over all classes, its distance standardized on the validation split.
            standard = [(_distance2(b, a[f"block{i}_mean"][None], a[f"block{i}_whiten"])[:, 0]
                         - a[f"center_block{i}"]) / a[f"spread_block{i}"] for i, b in enumerate(blocks) if i > 0]
            out["layers"] = np.mean(standard, axis=0) if standard else np.zeros(len(f))
        if "combined" in want:
            maha = (out["mahalanobis"] - a["center_mahalanobis"]) / a["spread_mahalanobis"]
            out["combined"] = np.mean([maha, *standard], axis=0)
        return out

    def score(self, features: np.ndarray, logits: np.ndarray, method: str | None = None) -> np.ndarray:
        """(N,) the detector's score, higher = more foreign (another method's with `method`)."""
        method = method or self.method
        return self.scores(features, logits, (method,))[method]

    def flagged(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        return self.score(features, logits) > self.threshold

    def with_method(self, method: str, val_scores: np.ndarray) -> "Detector":
        """The same fit scoring with another method, its threshold set on `val_scores` (that method's
        scores of the clean validation split)."""
        check_method(method)
        return dataclasses.replace(self, method=method, threshold=threshold_for(val_scores),
                                   info={**self.info, "method": method})

    def describe(self) -> dict:
        """For the model card and reports: the method, its threshold and what it was fitted on."""
        return {"method": self.method, "threshold": self.threshold, "flag_share_target": FLAG_SHARE,
                **{k: v for k, v in self.info.items() if k != "method"}}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"unknown OOD score {method!r}; choose one of {', '.join(METHODS)}")


def threshold_for(val_scores: np.ndarray, share: float = FLAG_SHARE) -> float:
    """The smallest threshold t from the scores themselves with at most floor(share * n) scores > t."""
    s = np.sort(np.asarray(val_scores, np.float64))
    if len(s) == 0:
        raise UserError("cannot set an OOD threshold on an empty validation split")
    allowed = int(np.floor(share * len(s)))
    return float(s[len(s) - 1 - allowed])


def _median_spread(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q25, q50, q75 = np.percentile(x, [25, 50, 75])
    return np.asarray(q50), np.asarray(max(q75 - q25, 1e-12))


def fit(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray, val_logits: np.ndarray,
        head: tuple[np.ndarray, np.ndarray], num_classes: int, blocks: list[tuple[str, int]] | None = None,
        method: str = DEFAULT_METHOD, knn_k: int = KNN_K, info: dict | None = None) -> Detector:
    """A detector fitted on training features (labels: each row's class) with the threshold set on the
    validation split's features and logits. head: the head's (kernel (D, K), bias (K,)), for ViM.
    blocks: (name, width) of each feature block, the penultimate first (Extractor.blocks); None: the
    features are the penultimate ones only."""
    check_method(method)
    f = np.asarray(train_features, np.float64)
    y = np.asarray(train_labels)
    if len(f) == 0:
        raise UserError("cannot fit an OOD detector on no training images")
    blocks = blocks or [("penultimate", f.shape[1])]
    widths = [w for _, w in blocks]
    if sum(widths) != f.shape[1]:
        raise UserError(f"feature blocks of {sum(widths)} columns for {f.shape[1]} features")
    d = widths[0]
    p = f[:, :d]
    # Class means; a class absent from the training split gets the overall mean (no distance to it is special).
    means = np.stack([p[y == c].mean(0) if (y == c).any() else p.mean(0) for c in range(num_classes)])
    arrays = {"block_widths": np.asarray(widths), "means": means,
              "whiten": _whitening(p - means[y], len(p) - num_classes), "bank": _unit(p), "knn_k": np.asarray(knn_k)}
    # ViM: the origin where the logits are all zero, the principal subspace of the training features
    # around it, and alpha scaling the residual norm to the mean largest logit.
    kernel, bias = (np.asarray(v, np.float64) for v in head)
    origin = -np.linalg.pinv(kernel.T) @ bias
    x = p - origin
    _, vecs = np.linalg.eigh(x.T @ x / len(x))
    principal = d // 2 if d > 16 else max(d - num_classes, 1)
    arrays["vim_origin"], arrays["vim_residual"] = origin, vecs[:, : d - principal]  # eigh: ascending
    residual = np.linalg.norm(x @ arrays["vim_residual"], axis=1)
    arrays["vim_alpha"] = np.asarray((p @ kernel + bias).max(-1).mean() / max(residual.mean(), 1e-12))
    edges = np.cumsum([0, *widths])
    for i in range(1, len(widths)):
        b = f[:, edges[i]:edges[i + 1]]
        arrays[f"block{i}_mean"] = b.mean(0)
        arrays[f"block{i}_whiten"] = _whitening(b - b.mean(0), len(b) - 1)
    # Standardize each distance by its median and interquartile range on the validation split, so that
    # the blocks weigh the same in the mean.
    vf = np.asarray(val_features, np.float64)
    arrays["center_mahalanobis"], arrays["spread_mahalanobis"] = _median_spread(
        _distance2(vf[:, :d], means, arrays["whiten"]).min(1))
    for i in range(1, len(widths)):
        v = vf[:, edges[i]:edges[i + 1]]
        arrays[f"center_block{i}"], arrays[f"spread_block{i}"] = _median_spread(
            _distance2(v, arrays[f"block{i}_mean"][None], arrays[f"block{i}_whiten"])[:, 0])
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    detector = Detector(method, 0.0, {k: v.astype(np.float32) if v.dtype.kind == "f" and v.ndim else v
                                      for k, v in arrays.items()}, {})
    val_score = detector.score(val_features, val_logits)
    threshold = threshold_for(val_score)
    return dataclasses.replace(detector, threshold=threshold, info={
        "method": method, "knn_k": knn_k, "blocks": [list(b) for b in blocks], "train_features": int(len(f)),
        "val_images": int(len(val_score)), "val_flagged_share": float((val_score > threshold).mean()),
        **(info or {})})


# ---------------------------------------------------------------------------------------------
# The workdir's ood.npz and ood.json.

def save(workdir: str, detector: Detector) -> None:
    np.savez(os.path.join(workdir, OOD_ARRAYS), **detector.arrays)
    record = {"method": detector.method, "threshold": detector.threshold, "info": detector.info,
              "arrays": OOD_ARRAYS}
    tmp = os.path.join(workdir, OOD_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(workdir, OOD_FILE))


def load(workdir: str) -> Detector | None:
    """The workdir's detector, or None when it has none (fit one with `jaxcell ood --workdir DIR`)."""
    path = os.path.join(workdir, OOD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    arrays_path = os.path.join(workdir, record.get("arrays", OOD_ARRAYS))
    if not os.path.isfile(arrays_path):
        raise UserError(f"{path} names {arrays_path}, which is missing; refit with jaxcell ood --workdir {workdir}")
    with np.load(arrays_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    check_method(record["method"])
    return Detector(record["method"], float(record["threshold"]), arrays, record.get("info", {}))


def require(workdir: str) -> Detector:
    detector = load(workdir)
    if detector is None:
        raise UserError(f"{workdir} has no OOD detector ({OOD_FILE}); fit one with: jaxcell ood --workdir {workdir}")
    return detector


# ---------------------------------------------------------------------------------------------
# A trained workdir: extract, fit, store.

def extractor_for(member, batch_size: int = 64) -> Extractor:
    """The Extractor of a restored workdir (jaxcell.evaluate.Member)."""
    from jaxcell import models

    model = models.create(member.record["model"], **member.record["model_kwargs"])
    variables = {"params": member.state.params, "batch_stats": member.state.batch_stats}
    return Extractor(model, variables, member.record["preprocessing"], batch_size)


def head_weights(member) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of the dense layer whose input is the penultimate feature, for ViM."""
    import jax

    return dense_of_head(jax.device_get(member.state.params), member.record["model"])


def dense_of_head(params: dict, model_name: str) -> tuple[np.ndarray, np.ndarray]:
    """The last dense layer (kernel, bias) in the parameters of a model's head module."""
    from jaxcell import models

    def last_dense(tree):
        if "kernel" in tree:
            return tree
        found = [last_dense(v) for v in tree.values() if isinstance(v, dict)]
        found = [f for f in found if f is not None]
        return found[-1] if found else None

    dense = last_dense(params[models.spec(model_name).head])
    return np.asarray(dense["kernel"]), np.asarray(dense["bias"])


def fit_workdir(workdir: str, checkpoint="best", method: str = DEFAULT_METHOD, views: int = AUGMENTED_VIEWS,
                batch_size: int = 64, datasets=None, cache_dir: str | None = None, log=lambda m: None) -> Detector:
    """Fit a detector on a workdir's training split (clean and `views` augmented copies), set its threshold on
    the validation split and store it in the workdir."""
    from jaxcell import evaluate
    from jaxcell.train import TrainConfig, augmentation

    check_method(method)
    member = evaluate.restore(workdir, checkpoint)
    datasets = datasets if datasets is not None else evaluate.Datasets(cache_dir)
    ds = datasets.get(member)
    for split in ("train", "val"):
        if split not in ds.splits or len(ds.splits[split][1]) == 0:
            raise UserError(f"{workdir}: its data has no {split!r} split to fit an OOD detector on")
    extract = extractor_for(member, batch_size)
    images, labels = ds.splits["train"]
    config = TrainConfig(**member.record["train"])
    augment = augmentation(config)
    feats, ys = [extract(images)[0]], [labels]
    for v in range(views if augment else 0):
        log(f"OOD: features of augmented training copy {v + 1}/{views}")
        feats.append(extract(images, augment=augment, seed=v)[0])
        ys.append(labels)
    val_images, _ = ds.splits["val"]
    val_features, val_logits = extract(val_images)
    detector = fit(np.concatenate(feats), np.concatenate(ys), val_features, val_logits, head_weights(member),
                   len(member.record["class_names"]), extract.blocks, method, info={
                       "fitted_on": f"the training split of {ds.source} ({len(labels)} images"
                                    + (f", and {views} copies under the training augmentation" if augment and views
                                       else "") + ")",
                       "threshold_set_on": f"the validation split ({len(val_images)} clean images)",
                       "augmented_views": views if augment else 0, "augmentation": augment,
                       "checkpoint_step": member.step,
                       "fitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    save(workdir, detector)
    # predict reports calibrated probabilities: make sure the temperature is there too.
    evaluate.temperature(member, datasets, False, batch_size, refit=False)
    return detector


def foreign_images(folder: str, image_size: int) -> tuple[np.ndarray, list[str]]:
    """Every image file under `folder`, any layout (sorted paths), at `image_size`."""
    from jaxcell.data.folders import _is_image, _visible

    if not os.path.isdir(folder):
        raise UserError(f"--ood-data {folder}: not a folder")
    paths = sorted(str(p) for p in _walk(folder) if _is_image(p) and _visible(p))
    if not paths:
        raise UserError(f"--ood-data {folder}: no image files found under it")
    from jaxcell.data.images import load_images

    return load_images(paths, image_size), paths


def _walk(folder: str):
    from pathlib import Path

    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            yield Path(root) / name


def fpr_at_tpr(scores: np.ndarray, positive: np.ndarray, tpr: float = 0.95) -> float:
    """The share of negatives (in-distribution) scored at or above the threshold that catches `tpr` of
    the positives (foreign)."""
    positive = np.asarray(positive, bool)
    s = np.asarray(scores, np.float64)
    pos, neg = s[positive], s[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    t = np.sort(pos)[int(np.floor((1 - tpr) * len(pos)))]   # at least tpr of positives are >= t
    return float((neg >= t).mean())


def separation(detector: Detector, inside: tuple[np.ndarray, np.ndarray], foreign: tuple[np.ndarray, np.ndarray],
               method: str | None = None) -> dict:
    """AUROC (foreign = positive), FPR at 95% TPR and the flagged share of each side."""
    from jaxcell.evaluate import roc_auc

    a = detector.score(*inside, method=method)
    b = detector.score(*foreign, method=method)
    scores, positive = np.r_[a, b], np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)]
    return {"auroc": roc_auc(scores, positive), "fpr_at_95_tpr": fpr_at_tpr(scores, positive),
            "flagged_in_distribution": float((a > detector.threshold).mean()) if method in (None, detector.method)
            else None,
            "flagged_foreign": float((b > detector.threshold).mean()) if method in (None, detector.method) else None}


@dataclasses.dataclass
class Measurement:
    result: dict                       # JSON-ready, under "ood" in evaluate's report
    inside: np.ndarray                 # the detector's scores of the in-distribution side
    foreign: np.ndarray | None         # ... and of the foreign side
    threshold: float


def measure(member, images: np.ndarray, labels: np.ndarray, folder: str | None = None, inside_source: str = "",
            batch_size: int = 64) -> Measurement:
    """The detector of a restored workdir on in-distribution images (with labels) and, with `folder`, on
    every image under it: flagged shares, accuracy of all and of the accepted images, AUROC, FPR at 95% TPR
    for the chosen score and, for comparison, every other one."""
    detector = require(member.workdir)
    names = member.record["class_names"]
    extract = extractor_for(member, batch_size)
    inside = extract(images)
    a = detector.score(*inside)
    flagged = a > detector.threshold
    correct = inside[1].argmax(-1) == np.asarray(labels)
    result = {"detector": detector.describe(),
              "in_distribution": {"data": inside_source, "images": int(len(a)), "flagged_share": float(flagged.mean()),
                                  "accuracy": float(correct.mean()),
                                  "accuracy_accepted": float(correct[~flagged].mean()) if (~flagged).any() else None}}
    if folder is None:
        return Measurement(result, a, None, detector.threshold)
    foreign_imgs, paths = foreign_images(folder, member.image_size)
    foreign = extract(foreign_imgs)
    b = detector.score(*foreign)
    foreign_flagged = b > detector.threshold
    predicted = foreign[1].argmax(-1)
    healthy = names.index("Benign") if "Benign" in names else None
    result["foreign"] = {
        "data": os.path.abspath(folder), "images": int(len(b)), "flagged_share": float(foreign_flagged.mean()),
        # Foreign images a user would read as leukemia: called a leukemia class and not flagged.
        "called_leukemia_unflagged": (float(((predicted != healthy) & ~foreign_flagged).mean())
                                      if healthy is not None else None),
        "predicted": {n: int((predicted == i).sum()) for i, n in enumerate(names)}}
    for method in METHODS:
        s = separation(detector, inside, foreign, method)
        entry = {"auroc": s["auroc"], "fpr_at_95_tpr": s["fpr_at_95_tpr"]}
        if method == detector.method:
            result.update(entry)
        result.setdefault("per_method", {})[method] = entry
    return Measurement(result, a, b, detector.threshold)


def format_measurement(result: dict) -> str:
    d, inside = result["detector"], result["in_distribution"]
    lines = [f"OOD detector: {d['method']}, threshold {d['threshold']:.4g} "
             f"(fitted on {d.get('fitted_on', '?')})",
             f"in distribution ({inside['images']} images): flagged {inside['flagged_share']:.2%}; "
             f"accuracy {inside['accuracy']:.4f}, of the accepted {_fmt(inside['accuracy_accepted'])}"]
    if "foreign" in result:
        f = result["foreign"]
        lines.append(f"foreign ({f['images']} images in {f['data']}): flagged {f['flagged_share']:.2%}; "
                     f"AUROC {result['auroc']:.4f}, FPR at 95% TPR {result['fpr_at_95_tpr']:.4f}"
                     + (f"; called leukemia without a flag {f['called_leukemia_unflagged']:.2%}"
                        if f["called_leukemia_unflagged"] is not None else ""))
        lines.append("other scores (AUROC / FPR@95): " + "  ".join(
            f"{m} {v['auroc']:.3f}/{v['fpr_at_95_tpr']:.3f}" for m, v in result["per_method"].items()))
    return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
