"""A trained model ready to answer: what `jaxcell predict` and `jaxcell serve` share.

    predictor = Predictor.load("runs/a")                  # a workdir (best checkpoint) ...
    predictor = Predictor.load("model.safetensors")       # ... or an exported file with its sidecar
    fn = predictor.program(cam=True)                      # pure: (variables, uint8 NHWC) -> outputs, jit-able
    out = jax.jit(fn)(predictor.variables, images)        # {"logits", "features"?, "detector_logits"?, "maps"?}
                                                          # (kernels.jit(fn, kernels.for_devices()): faster on CPUs)
    predictor.answers(out["logits"], out.get("features"), out.get("detector_logits"))   # class, p, OOD
    predictor.outputs(images, batch_size=64)               # the same program over many images, batched

`probabilities` are the model's softmax; `calibrated_probabilities` are those after the temperature
stored in the workdir's calibration.json for the checkpoint's step (`jaxcell evaluate` fits it on the
validation split), None without one. The out-of-distribution detector is the workdir's (jaxcell.ood);
without one `in_distribution` and `ood_score` are None (runs trained before it existed).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxcell import calibration
from jaxcell.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclasses.dataclass
class Predictor:
    source: str                    # the workdir or the weights file it was loaded from
    workdir: str | None            # None for a weights file
    record: dict                   # config.json (or the sidecar, in the same shape)
    model: object                  # the flax module
    variables: dict                # {"params", "batch_stats"} on the default device
    step: int                      # the checkpoint's training step (0 for a weights file)
    temperature: float | None      # None: no temperature recorded, probabilities uncalibrated
    calibration_note: str
    detector: object | None        # jaxcell.ood.Detector, or None

    @classmethod
    def load(cls, source: str, checkpoint="best", model: str | None = None, fit_temperature: bool = False,
             log=lambda message: None) -> "Predictor":
        """A workdir or an exported weights file (with its sidecar, FILE.json). fit_temperature: when the
        workdir records none, fit one on its validation split now and store it (as `jaxcell evaluate` does)."""
        import jax

        from jaxcell import models

        if os.path.isfile(source) and source.lower().endswith(WEIGHT_SUFFIXES):
            from jaxcell.export import read_torch

            record, variables = read_torch(source, model)
            record = {**record, "data": {"source": "not recorded (an exported weights file)", "sizes": {}}}
            return cls(source, None, record, models.create(record["model"], **record["model_kwargs"]),
                       jax.device_put(variables), 0, None, "an exported file carries no temperature", None)
        if os.path.isfile(source):
            raise UserError(f"{source}: neither a workdir nor a weights file ({', '.join(WEIGHT_SUFFIXES)})")
        from jaxcell.evaluate import Datasets, restore, temperature
        from jaxcell.train import local

        member = restore(source, checkpoint, model)  # checks the checkpoint's name and the model
        step = int(local(member.state.step))
        entry = calibration.read_temperature(source, step, False)
        if entry is None and fit_temperature:
            try:
                entry = temperature(member, Datasets(None), False, 64, refit=False)
                log(f"fitted the temperature on the validation split: T = {entry['temperature']:.4g}")
            except UserError as error:  # its data is gone or has no validation split
                log(f"no temperature scaling: {error}")
        t = None if entry is None else float(entry["temperature"])
        note = (f"temperature {t:.4g} fitted on the {entry.get('fitted_on', 'val split')} "
                f"({entry.get('num_examples', '?')} images)" if entry else
                f"no temperature recorded for step {step}; run jaxcell evaluate --workdir {source} to fit one")
        # On the default device once (restored arrays are replicated over every device of the mesh).
        variables = jax.device_put(jax.device_get({"params": member.state.params,
                                                   "batch_stats": member.state.batch_stats}))
        model = models.create(member.record["model"], **member.record["model_kwargs"])
        return cls(source, source, member.record, model,
                   variables, step, t, note, load_detector(source, step, log))

    @property
    def class_names(self) -> list[str]:
        return list(self.record["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.record["preprocessing"]["image_size"])

    def program(self, cam: bool = False, cam_layer: str | None = None, batch_size: int = 1):
        """A pure function (variables, uint8 images (batch_size, S, S, 3)) -> {"logits", "features" and
        "detector_logits" when there is a detector, "maps" (Grad-CAM of the predicted class, [0, 1]) with
        cam}. The batch size only fixes the shape the Grad-CAM layer is looked up with; jit it for any batch."""
        import jax
        import jax.numpy as jnp

        from jaxcell.explain import cam_function
        from jaxcell.train import prepare

        preprocessing, model = self.record["preprocessing"], self.model
        shape = (batch_size, self.image_size, self.image_size, 3)
        run = None
        if cam:
            _, run = cam_function(model, self.variables, jax.ShapeDtypeStruct(shape, jnp.float32), cam_layer)
        with_detector = self.detector is not None

        def fn(variables, images):
            x = prepare(images, preprocessing)
            # The logits of the trainer's own eval step (torch-exact input normalization), whatever else runs.
            out = {"logits": model.apply(variables, x, train=False)}
            if with_detector:  # what the detector scores, computed as when it was fitted (jaxcell.ood)
                from jaxcell.ood import detector_inputs

                out["features"], out["detector_logits"] = detector_inputs(
                    model, variables, images.astype(jnp.float32) / 255.0, preprocessing)
            if run is not None:
                out["maps"] = run(variables, x)[0]
            return out

        return fn

    def outputs(self, images: np.ndarray, batch_size: int = 64, cam: bool = False,
                cam_layer: str | None = None) -> dict:
        """`program` over many uint8 images: one compiled batch size, the last batch padded."""
        from jaxcell import kernels

        fn = kernels.jit(self.program(cam, cam_layer, batch_size), kernels.for_devices())
        parts = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            n = len(chunk)
            if n < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            parts.append({k: np.asarray(v)[:n] for k, v in fn(self.variables, chunk).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in (parts[0] if parts else {})}

    def answers(self, logits: np.ndarray, features: np.ndarray | None = None,
                detector_logits: np.ndarray | None = None) -> list[dict]:
        """Per image: class, probabilities, calibrated_probabilities, in_distribution, ood_score (each
        None when there is no temperature, or no detector). features, detector_logits: `program`'s
        outputs of those names (the detector's own inputs)."""
        names = self.class_names
        raw = calibration.softmax(logits)
        calibrated = None if self.temperature is None else calibration.softmax(logits, self.temperature)
        scores = None
        if self.detector is not None and features is not None:
            scores = self.detector.score(features, logits if detector_logits is None else detector_logits)

        def rounded(p):
            return {n: round(float(v), 6) for n, v in zip(names, p)}

        return [{"class": names[int(p.argmax())], "probabilities": rounded(p),
                 "calibrated_probabilities": None if calibrated is None else rounded(calibrated[i]),
                 "in_distribution": None if scores is None else bool(scores[i] <= self.detector.threshold),
                 "ood_score": None if scores is None else round(float(scores[i]), 6)}
                for i, p in enumerate(raw)]


def load_detector(workdir: str, step: int, log):
    """The workdir's out-of-distribution detector, or None (with a note in the log)."""
    from jaxcell import ood

    detector = ood.load(workdir)
    if detector is None:
        log(f"note: {workdir} has no OOD detector, so no in_distribution / ood_score; "
            f"fit one with: jaxcell ood --workdir {workdir}")
    elif detector.info.get("checkpoint_step") not in (None, step):
        log(f"note: the OOD detector was fitted on step {detector.info['checkpoint_step']}, this is step {step}; "
            f"refit with jaxcell ood --workdir {workdir} --checkpoint {step}")
    return detector
