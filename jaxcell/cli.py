"""The `jaxcell` command.

    jaxcell train     --model NAME [--data DIR] --workdir DIR ...
    jaxcell train     --recipe NAME --data DIR --workdir DIR [flags overriding the recipe]
    jaxcell recipes
    jaxcell evaluate  --workdir DIR [--workdir DIR ...] [--data DIR] [--split test] [--tta]
                      [--stain-shift S] [--fit-temperature] [--ood-data FOLDER] [--out report.json]
    jaxcell predict   --workdir DIR [--cam OUTDIR] [--explain ig --explain-out DIR] IMAGE...
    jaxcell serve     --workdir DIR | --weights FILE [--host 127.0.0.1] [--port 8000] [--token T]
                      [--max-upload-mb 20]
    jaxcell ood       --workdir DIR [--method combined] [--views 2]
    jaxcell report    --workdir DIR --out report.html [--data DIR] [--split test] [--ood-data FOLDER]
                      [--faithfulness N]
    jaxcell audit     --data DIR [--json FILE]
    jaxcell table     --workdir DIR [--workdir DIR ...] [--split val] [--shift 0.03] [--markdown FILE]
                      [--save-records DIR];  or --records DIR [--records DIR ...]
    jaxcell parity    --model NAME [--image-size N] [--batch N] [--seed N] [--train-steps N] [--dtype float64]
    jaxcell export    --workdir DIR --out FILE [--format safetensors|torch|onnx [--quantize int8]] [--checkpoint best|last]
    jaxcell import    --torch FILE --workdir DIR [--model NAME]
    jaxcell summary   [--model NAME] [--image-size N] [--format markdown]
    jaxcell bench     --model NAME --json FILE [--image-size N] [--batch-size N] [--precision fp32,bf16]
                      [--frameworks jax,torch,torch-compile] [--steps N] [--devices 1,2,4] [--quick] [--pipeline]

Mistakes a user can fix (paths, names, files) end with one line on stderr and exit code 2.
"""

import argparse
import json
import os
import signal
import sys

from jaxcell import settings
from jaxcell.errors import UserError
from jaxcell.settings import model_arg, non_negative_float, non_negative_int, positive  # argparse types


def _evaluation_args(e: argparse.ArgumentParser, ensemble: bool) -> None:
    """The options `evaluate` and `report` share."""
    if ensemble:
        e.add_argument("--workdir", required=True, action="append",
                       help="a trained workdir; repeat for an ensemble (probabilities averaged)")
    else:
        e.add_argument("--workdir", required=True)
    e.add_argument("--model", help="refuse a workdir of another model")
    e.add_argument("--data", help="evaluate every image of this class-folder tree")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--checkpoint", default="best", help="best, last or a step number")
    e.add_argument("--batch-size", type=positive, default=64)
    e.add_argument("--tta", action="store_true", help="average over the 8 flips and 90-degree rotations")
    e.add_argument("--stain-shift", type=non_negative_float, default=0.0, metavar="S",
                   help="evaluate on HED stain-shifted copies of the images (strength S, e.g. 0.03)")
    e.add_argument("--stain-seed", type=int, default=0, help="the fixed seed of --stain-shift")
    e.add_argument("--cache-dir")
    e.add_argument("--ood-data", metavar="FOLDER",
                   help="also measure the OOD detector: these images (any layout) against the evaluated ones")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxcell", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model; no --data: synthetic smears")
    t.add_argument("--recipe", metavar="NAME",
                   help="start from a shipped training configuration (see `jaxcell recipes`); flags override it")
    settings.add_flags(t)  # every TrainConfig field's flag
    # What a run does besides its settings (not recorded in config.json's "train").
    t.add_argument("--log-every", type=positive, default=50, metavar="STEPS",
                   help="read loss, accuracy and finiteness from the device every STEPS steps and at each "
                        "epoch's end (default 50); the steps between run without waiting for it")
    t.add_argument("--workdir", required=True)
    t.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --workdir")
    t.add_argument("--cache-dir", help="where decoded datasets are cached (default ~/.cache/jaxcell)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--no-ood", action="store_true",
                   help="do not fit the out-of-distribution detector at the end (jaxcell ood fits it later)")
    t.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="multi-host: the address of process 0 (with --num-processes and --process-id); "
                        "under SLURM or Open MPI these are detected")
    t.add_argument("--num-processes", type=positive)
    t.add_argument("--process-id", type=int)

    sub.add_parser("recipes", help="the shipped training configurations (jaxcell train --recipe NAME)")

    e = sub.add_parser("evaluate", help="metrics of a trained model (or an ensemble) on a split or a folder")
    _evaluation_args(e, ensemble=True)
    e.add_argument("--fit-temperature", action="store_true",
                   help="refit the temperature on the validation split even if calibration.json has one "
                        "(it is fitted and stored there on first use anyway)")
    e.add_argument("--no-calibration", action="store_true", help="skip temperature scaling")
    e.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples for the 95%% intervals (fixed seed); 0: none")
    e.add_argument("--out", help="write the report as JSON here")

    r = sub.add_parser("report", help="a self-contained HTML report (metrics, plots, Grad-CAM gallery)")
    _evaluation_args(r, ensemble=False)
    r.add_argument("--out", required=True, help="the HTML file; the figures are also written beside it as PNG")
    r.add_argument("--cams", type=int, default=8, metavar="N", help="Grad-CAM cases per gallery (right, wrong); 0: none")
    r.add_argument("--faithfulness", type=int, default=0, metavar="N",
                   help="deletion/insertion curves of the explanation methods on N images (use --split val)")

    tb = sub.add_parser("table", help="the paper's Table I, measured: one row per trained workdir and split")
    tb.add_argument("--workdir", action="append", default=[], help="a trained workdir; repeat for more rows")
    tb.add_argument("--records", action="append", default=[], metavar="DIR",
                    help="instead of a workdir: a run's records (--save-records), no checkpoints needed")
    tb.add_argument("--save-records", metavar="DIR",
                    help="keep each workdir's records (config, metrics, evaluation reports) in DIR/<its name>")
    tb.add_argument("--split", action="append", choices=["train", "val", "test"],
                    help="repeat for a row per split (default: val)")
    tb.add_argument("--shift", type=non_negative_float, default=0.03, metavar="S",
                    help="HED strength of the stain-shifted column")
    tb.add_argument("--checkpoint", default="last",
                    help="last (default: not chosen on the validation split), best or a step number")
    tb.add_argument("--markdown", help="also write the table here")
    tb.add_argument("--json", help="write the rows as JSON here")

    a = sub.add_parser("audit", help="dataset audit: colour shortcut, duplicates, balance, sizes")
    a.add_argument("--data", required=True, help="a class-folder tree")
    a.add_argument("--json", help="write the audit as JSON here")
    a.add_argument("--folds", type=positive, default=5)
    a.add_argument("--shift", type=float, default=0.03, metavar="S", help="HED stain-shift strength")
    a.add_argument("--hash-distance", type=int, default=4, metavar="D",
                   help="near duplicates: difference hashes at most D bits apart (of 64); the training "
                        "split groups them at 4")
    a.add_argument("--per-class", type=positive, metavar="N", help="audit only the first N images of each class")
    a.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("predict", help="class probabilities for image files, one JSON line each")
    p.add_argument("--workdir", required=True)
    p.add_argument("--model", help="refuse a workdir of another model")
    p.add_argument("--checkpoint", default="best")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--cam", metavar="OUTDIR", help="also write a Grad-CAM overlay PNG per image here")
    p.add_argument("--cam-layer", help="the layer for --cam (flax or torch module path); default per model")
    p.add_argument("--explain", choices=["gradcam", "ig", "shap", "occlusion"],
                   help="write an attribution overlay PNG and the raw attributions (.npy, NHWC) per image")
    p.add_argument("--explain-out", metavar="DIR", help="where --explain writes")
    p.add_argument("--explain-steps", type=positive, metavar="N", help="IG steps (default 50) or SHAP samples (20)")
    p.add_argument("images", nargs="+", metavar="IMAGE")

    v = sub.add_parser("serve", help="serve a trained model over HTTP: a page, /predict, /model, /health")
    source = v.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a trained workdir")
    source.add_argument("--weights", metavar="FILE",
                        help="an exported .safetensors (or .pt) with its sidecar FILE.json")
    v.add_argument("--checkpoint", default="best", help="with --workdir: best, last or a step number")
    v.add_argument("--host", default="127.0.0.1", help="any address but loopback needs --token")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every request but /health "
                                   "(default: $JAXCELL_TOKEN)")
    v.add_argument("--max-upload-mb", type=float, default=20, metavar="MB", help="the largest image file accepted")
    v.add_argument("--max-megapixels", type=float, default=50, metavar="MP",
                   help="the largest image accepted, read from its header before decoding")
    v.add_argument("--batch-size", type=positive, default=16,
                   help="the largest compiled batch (1, 2, 4, ... up to it are compiled): concurrent requests share it")
    v.add_argument("--max-wait-ms", type=non_negative_float, default=5.0,
                   help="how long a batch waits for more requests, from its first request's arrival, before it runs")
    v.add_argument("--concurrent-batches", type=positive, default=2,
                   help="batches that may run at once: while one computes, the next forms and starts (1: one "
                        "after another)")
    v.add_argument("--cam-layer", help="the Grad-CAM layer (flax or torch module path); default per model")
    v.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep the compiled program in JAX's persistent cache (~/.cache/jaxcell/xla)")

    o = sub.add_parser("ood", help="fit the out-of-distribution detector of a trained workdir (ood.json, ood.npz)")
    o.add_argument("--workdir", required=True)
    o.add_argument("--checkpoint", default="best", help="best, last or a step number")
    o.add_argument("--method", default=None, help="the score: msp, energy, mahalanobis, knn, vim, combined "
                                                  "(default combined)")
    o.add_argument("--views", type=non_negative_int, default=None, metavar="N",
                   help="augmented copies of the training split to fit on besides the clean one (default 2)")
    o.add_argument("--batch-size", type=positive, default=64)
    o.add_argument("--cache-dir")

    q = sub.add_parser("parity", help="layer-by-layer comparison of the JAX model with its torch twin")
    q.add_argument("--model", required=True)
    q.add_argument("--image-size", type=positive, default=64)
    q.add_argument("--batch", type=positive, default=2)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--tolerance", type=float, default=1e-5)
    q.add_argument("--train-steps", type=positive, metavar="N",
                   help="also train both twins N Adam steps from the same weights and compare every step")
    q.add_argument("--lr", type=float, default=1e-3, help="with --train-steps")
    q.add_argument("--train-tolerance", type=float, help="with --train-steps (default: parity.training's)")
    q.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="with --train-steps: float64 trains both twins in float64 and compares every element")
    q.add_argument("--model-arg", action="append", type=model_arg, default=[], metavar="KEY=VALUE",
                   help="with --train-steps: a constructor argument, e.g. widths=(8,16,16)")

    x = sub.add_parser("export", help="a trained workdir -> a torch_ref state dict (+ FILE.json sidecar)")
    x.add_argument("--workdir", required=True)
    x.add_argument("--format", choices=["safetensors", "torch", "onnx"],
                   help="default: from the --out extension (.safetensors, or .pt/.pth for torch.save)")
    x.add_argument("--out", required=True, metavar="FILE")
    x.add_argument("--checkpoint", default="best", help="best, last or a step number")
    x.add_argument("--quantize", choices=["int8"], help="onnx: also write FILE.int8.onnx (static QDQ)")
    x.add_argument("--calibration-images", type=positive, default=200, metavar="N",
                   help="--quantize: training images to calibrate on")

    i = sub.add_parser("import", help="a torch_ref state dict (.safetensors, .pt) -> a jaxcell workdir")
    i.add_argument("--torch", required=True, metavar="FILE")
    i.add_argument("--workdir", required=True)
    i.add_argument("--model", help="needed when FILE has no sidecar (FILE.json)")
    i.add_argument("--image-size", type=positive, help="without a sidecar: the model's image size (default 224)")
    i.add_argument("--model-arg", action="append", type=model_arg, default=[], metavar="KEY=VALUE",
                   help="without a sidecar: a constructor argument (num_classes is read from the weights)")
    i.add_argument("--overwrite", action="store_true", help="replace a run already in --workdir")

    s = sub.add_parser("summary", help="parameters and forward FLOPs per image")
    s.add_argument("--model", help="one model (default: every registered model)")
    s.add_argument("--image-size", type=positive, default=224)
    s.add_argument("--model-arg", action="append", type=model_arg, default=[], metavar="KEY=VALUE")
    s.add_argument("--format", choices=["text", "markdown"], default="text")

    b = sub.add_parser("bench", help="training and inference throughput: JAX against PyTorch eager and compiled")
    b.add_argument("--model", required=True)
    b.add_argument("--image-size", type=positive)
    b.add_argument("--batch-size", type=positive, help="per device")
    b.add_argument("--frameworks", type=_names, help="jax, torch, torch-compile, jax-baseline, jax-eigen, onnx, onnx-int8 (comma-separated)")
    b.add_argument("--modes", type=_names, default=["train", "infer"], help="train, infer (comma-separated)")
    b.add_argument("--precision", type=_names, default=["fp32"], help="fp32, bf16 (comma-separated)")
    b.add_argument("--steps", type=positive, help="timed steps (median reported)")
    b.add_argument("--warmup", type=positive, help="untimed steps first, compilation included")
    b.add_argument("--devices", type=_counts, default=[1], help="JAX device counts, e.g. 1,2,4 (weak scaling)")
    b.add_argument("--quick", action="store_true", help="tiny defaults (32 px, batch 4, 2 steps, jax and torch)")
    b.add_argument("--pipeline", action="store_true",
                   help="instead: the train step fed by the on-device and the host input pipelines against a "
                        "batch already on the device (JAX only; --precision and --devices apply)")
    b.add_argument("--model-arg", action="append", type=model_arg, default=[], metavar="KEY=VALUE")
    b.add_argument("--od-center", action="store_true",
                   help="every runner's preprocessing includes optical-density centring (as in a run trained with it)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--deadline", type=float, help="Unix time after which no further runner starts")
    b.add_argument("--require-gpu", action="store_true",
                   help="refuse to measure unless JAX and torch both compute on a GPU (bench/gpu.sh passes it)")
    b.add_argument("--json", required=True, help="write the results here")
    b.add_argument("--markdown", help="also write the table here")
    return parser


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _counts(text: str) -> list[int]:
    return [positive(t) for t in _names(text)]


def _write_json(path: str, result: dict, what: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{what} written to {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse once; `train`'s settings not given are the recipe's (--recipe NAME), else TrainConfig's defaults."""
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from jaxcell import recipes

        settings.fill(args, recipes.get(args.recipe).settings if args.recipe else None)
    return args


def cmd_recipes(args) -> int:
    from jaxcell import recipes

    print(recipes.describe())
    return 0


def cmd_train(args) -> int:
    from jaxcell import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    from jaxcell import data, models
    from jaxcell.train import is_main_process, train

    import jax

    layout = distributed.check_devices()
    if jax.process_count() > 1:  # every process's log says what it joined
        print(f"process {jax.process_index()}: {layout}", flush=True)

    recipe = None
    if args.recipe:
        from jaxcell import recipes

        r = recipes.get(args.recipe)
        recipe = f"{r.name} v{r.version}"
    config = settings.from_flags(args, default_lr=lambda name: models.spec(name).lr, recipe=recipe)
    models.create(config.model, image_size=config.image_size, **config.model_kwargs)  # unknown names fail first
    if args.recipe:
        lacking = recipes.missing(r, config.to_dict())
        if lacking:
            raise UserError(f"recipe {r.name} needs {lacking}")
    dataset = data.load(config.data, config.image_size, seed=data.split_seed(config.to_dict()),
                        synthetic_examples=config.synthetic_examples, cache_dir=args.cache_dir)
    if is_main_process():
        print(f"{args.model} on {dataset.source}: "
              + ", ".join(f"{k} {len(v[1])}" for k, v in dataset.splits.items()))
    result = train(config, dataset, args.workdir, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.no_progress, log_every=args.log_every)
    if result.interrupted or not is_main_process():
        return 0
    last = result.history[-1] if result.history else {}
    print(f"trained {args.model} in {result.seconds:.1f}s; last val accuracy "
          f"{last.get('val_accuracy', float('nan')):.4f}; workdir {args.workdir}")
    if args.no_ood or "val" not in dataset.splits or not len(dataset.splits["val"][1]):
        return 0
    if jax.process_count() > 1:
        # The fit restores the checkpoint and computes on this process alone, while the others have
        # left: in a multi-process job it would wait for them for ever (it did, in test_preemption).
        print(f"out-of-distribution detector not fitted in a multi-process job: run `jaxcell ood --workdir "
              f"{args.workdir}` on one machine")
        return 0
    _fit_ood(args.workdir, "best", None, None, args.batch_size, args.cache_dir, dataset)
    return 0


def _fit_ood(workdir, checkpoint, method, views, batch_size, cache_dir, dataset=None) -> None:
    from jaxcell import ood
    from jaxcell.evaluate import Datasets

    datasets = None
    if dataset is not None:  # the data train just loaded: no second decode
        from jaxcell import data
        from jaxcell.train import read_config

        t = read_config(workdir)["train"]
        datasets = Datasets(cache_dir)
        datasets.loaded[(t["data"], t["image_size"], data.split_seed(t), t["synthetic_examples"])] = dataset
    detector = ood.fit_workdir(workdir, checkpoint, method or ood.DEFAULT_METHOD,
                               ood.AUGMENTED_VIEWS if views is None else views, batch_size, datasets, cache_dir,
                               log=print)
    d = detector.describe()
    print(f"OOD detector ({d['method']}) fitted on {d['fitted_on']}; threshold {d['threshold']:.4g} flags "
          f"{d['val_flagged_share']:.2%} of {d['threshold_set_on']}; written to "
          f"{os.path.join(workdir, ood.OOD_FILE)}")


def cmd_ood(args) -> int:
    _fit_ood(args.workdir, args.checkpoint, args.method, args.views, args.batch_size, args.cache_dir)
    return 0


def _run_evaluation(args, workdirs: list[str], calibrate: bool = True, refit: bool = False, resamples: int = 1000):
    from jaxcell.evaluate import run_evaluation

    return run_evaluation(workdirs, checkpoint=args.checkpoint, model=args.model, data_dir=args.data,
                          split=args.split, tta=args.tta, shift=args.stain_shift, shift_seed=args.stain_seed,
                          calibrate=calibrate, refit_temperature=refit, batch_size=args.batch_size,
                          cache_dir=args.cache_dir, resamples=resamples, log=print)


def cmd_evaluate(args) -> int:
    from jaxcell.evaluate import format_evaluation

    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 or more, got {args.bootstrap}")
    if args.ood_data and len(args.workdir) > 1:
        raise UserError("--ood-data measures one workdir's OOD detector; give a single --workdir")
    if args.ood_data:
        from jaxcell import ood

        ood.require(args.workdir[0])  # before the evaluation's work, not after it
        if not os.path.isdir(args.ood_data):
            raise UserError(f"--ood-data {args.ood_data}: not a folder")
    evaluation = _run_evaluation(args, args.workdir, calibrate=not args.no_calibration,
                                 refit=args.fit_temperature, resamples=args.bootstrap)
    result = evaluation.result
    conditions = (" with TTA" if args.tta else "") + (
        f", stain-shifted (HED {args.stain_shift}, seed {args.stain_seed})" if args.stain_shift else "")
    print(f"{result['model']} on {result['data']}{conditions}")
    print(format_evaluation(result))
    if args.ood_data:
        from jaxcell import ood

        m = ood.measure(evaluation.members[0], evaluation.images, evaluation.labels, args.ood_data,
                        result["data"] + conditions, args.batch_size)
        result["ood"] = m.result
        print(ood.format_measurement(m.result))
    if args.out:
        _write_json(args.out, result, "report")
    return 0


def cmd_report(args) -> int:
    from jaxcell.report import write_report

    if not args.out.lower().endswith((".html", ".htm")):
        raise UserError(f"--out {args.out}: the report is an HTML file; name it *.html")
    from jaxcell import ood

    if args.ood_data:
        ood.require(args.workdir)
    evaluation = _run_evaluation(args, [args.workdir])
    measurement = None
    if ood.load(args.workdir) is not None:
        measurement = ood.measure(evaluation.members[0], evaluation.images, evaluation.labels, args.ood_data,
                                  evaluation.result["data"], args.batch_size)
    written = write_report(evaluation, args.out, cams=args.cams, ood=measurement, faithfulness=args.faithfulness)
    print(f"report written to {written[0]} (figures beside it: "
          + ", ".join(os.path.basename(p) for p in written[1:]) + ")")
    return 0


def cmd_table(args) -> int:
    from jaxcell.results import format_table, records_row, workdir_rows

    if not args.workdir and not args.records:
        raise UserError("give a trained --workdir or the --records of one")
    splits = args.split or ["val"]
    rows = [r for w in args.workdir for r in workdir_rows(w, splits, args.shift, args.checkpoint, args.save_records)]
    rows += [records_row(r, s, args.shift) for r in args.records for s in splits]
    table = format_table(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        _write_json(args.json, {"rows": rows}, "table")
    return 0


def cmd_audit(args) -> int:
    from jaxcell.audit import audit, format_audit

    result = audit(args.data, folds=args.folds, shift=args.shift, hash_distance=args.hash_distance,
                   per_class=args.per_class, seed=args.seed, log=print)
    print(format_audit(result))
    if args.json:
        _write_json(args.json, result, "audit")
    return 0


def cmd_predict(args) -> int:
    from jaxcell.data.images import load_images
    from jaxcell.inference import Predictor

    predictor = Predictor.load(args.workdir, args.checkpoint, args.model,
                               log=lambda message: print(f"jaxcell predict: {message}", file=sys.stderr))
    images = load_images(args.images, predictor.image_size)
    out = predictor.outputs(images, args.batch_size)
    cams = _write_cams(args, predictor, images) if args.cam else [None] * len(args.images)
    if args.explain:
        from jaxcell.explain import write_explanations

        if not args.explain_out:
            raise UserError("--explain needs --explain-out DIR")
        written = write_explanations(args.explain, predictor.model, predictor.variables,
                                     predictor.record["preprocessing"], images, args.images, args.explain_out,
                                     args.explain_steps, args.batch_size)
    answers = predictor.answers(out["logits"], out.get("features"), out.get("detector_logits"))
    for path, answer, cam in zip(args.images, answers, cams):
        # Keys without a value (no temperature, no detector) are left out, as before they existed.
        line = {"file": path, **{k: v for k, v in answer.items() if v is not None}}
        if cam:
            line["cam"] = cam
        if args.explain:
            line["explanation"] = written.pop(0)
        print(json.dumps(line))
    return 0


def _write_cams(args, predictor, images) -> list[str]:
    """Grad-CAM overlays of the predicted class, one PNG per image in args.cam."""
    from PIL import Image

    from jaxcell.explain import gradcam, overlay
    from jaxcell.train import prepare

    os.makedirs(args.cam, exist_ok=True)
    paths = []
    for start in range(0, len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        cam = gradcam(predictor.model, predictor.variables, prepare(chunk, predictor.record["preprocessing"]),
                      target_layer=args.cam_layer)
        for k, image in enumerate(chunk):
            i = start + k
            stem = os.path.splitext(os.path.basename(args.images[i]))[0]
            path = os.path.join(args.cam, f"{i:04d}_{stem}_cam.png")  # the index keeps equal names apart
            Image.fromarray(overlay(image, cam.maps[k])).save(path)
            paths.append(path)
    return paths


def cmd_serve(args) -> int:
    from jaxcell import serve

    return serve.command(args)


def cmd_parity(args) -> int:
    from jaxcell import models
    from parity import compare

    models.spec(args.model)
    code = compare.run(args.model, args.image_size, args.batch, args.seed, args.tolerance)
    if not args.train_steps:
        return code
    from parity import training

    print()
    return max(code, training.run(args.model, args.train_steps, args.image_size, args.batch, args.seed, args.lr,
                                  args.train_tolerance, dtype=args.dtype, **dict(args.model_arg)))


def cmd_export(args) -> int:
    from jaxcell.export import export_workdir

    which = int(args.checkpoint) if str(args.checkpoint).isdigit() else args.checkpoint
    if which not in ("best", "last") and not isinstance(which, int):
        raise UserError(f"--checkpoint must be best, last or a step number, not {args.checkpoint!r}")
    if args.format == "onnx" or args.out.lower().endswith(".onnx"):
        from parity.onnx_export import export_onnx

        written = export_onnx(args.workdir, args.out, which, args.quantize, args.calibration_images)
        print(f"exported {args.workdir} ({args.checkpoint}) to {', '.join(written)}; "
              f"run it with: python -m jaxcell.edge {args.out} IMAGE...")
        return 0
    if args.quantize:
        raise UserError("--quantize applies to --format onnx only")
    weights, sidecar = export_workdir(args.workdir, args.out, args.format, which)
    print(f"exported {args.workdir} ({args.checkpoint}) to {weights} with sidecar {sidecar}; "
          f"in PyTorch: torch_ref.load({weights!r})")
    return 0


def cmd_import(args) -> int:
    from jaxcell.export import import_torch

    kwargs = dict(args.model_arg)
    if args.image_size is not None:
        kwargs["image_size"] = args.image_size
    record = import_torch(args.torch, args.workdir, model=args.model, model_kwargs=kwargs, overwrite=args.overwrite)
    print(f"imported {args.torch} as {record['model']} ({record['model_kwargs']['num_classes']} classes: "
          f"{', '.join(record['class_names'])}) into {args.workdir}")
    return 0


def cmd_summary(args) -> int:
    from jaxcell import models
    from jaxcell.summary import format_summary, format_summary_markdown, summarize

    names = [models.spec(args.model).name] if args.model else models.names()
    rows = [summarize(n, args.image_size, **dict(args.model_arg)) for n in names]
    print((format_summary_markdown if args.format == "markdown" else format_summary)(rows))
    return 0


def cmd_bench(args) -> int:
    from jaxcell import bench

    return bench.command(args)


COMMANDS = {"train": cmd_train, "recipes": cmd_recipes, "evaluate": cmd_evaluate, "report": cmd_report,
            "audit": cmd_audit, "table": cmd_table,
            "predict": cmd_predict, "ood": cmd_ood, "serve": cmd_serve, "parity": cmd_parity, "export": cmd_export,
            "import": cmd_import,
            "summary": cmd_summary, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    import logging

    from jaxcell import compilation_cache
    from jaxcell._malloc import keep_freed_memory

    # The command owns its process, so it may set the allocator for it (before JAX starts its
    # threads); a program that imports jaxcell as a library decides for itself.
    keep_freed_memory()
    compilation_cache.enable()
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's and TFDS's info lines drown the report
    try:
        args = parse_args(argv)
    except UserError as error:  # an unknown recipe
        print(f"jaxcell: error: {error}", file=sys.stderr)
        return 2
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (`jaxcell recipes | head -1`): stop quietly, as Unix tools do.
        # stdout goes to /dev/null so that the interpreter's last flush finds nothing to fail on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except UserError as error:
        print(f"jaxcell {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxcell {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
