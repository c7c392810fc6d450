"""Accuracy of an exported ONNX model (fp32 and int8) against jaxcell on a workdir's own val and
test splits, clean and stain-shifted (HED 0.03, seed 0, as `jaxcell table`), file sizes and the
edge runner's peak memory. Writes JSON; docs/benchmarks.md has the figures.

    python bench/edge_accuracy.py --workdir runs/a --onnx model.onnx --json out.json
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--onnx", required=True, help="model.onnx with model.int8.onnx beside it")
    parser.add_argument("--shift", type=float, default=0.03)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    from jaxcell import data
    from jaxcell.edge import int8_path, session
    from jaxcell.evaluate import stain_shift
    from jaxcell.train import predict_logits, read_config, restore_for_inference

    record = read_config(args.workdir)
    t = record["train"]
    size = record["preprocessing"]["image_size"]
    ds = data.load(t["data"], size, seed=data.split_seed(t), synthetic_examples=t["synthetic_examples"])
    state, _, eval_step, placement = restore_for_inference(args.workdir, "best")
    files = {"fp32": args.onnx, "int8": int8_path(args.onnx)}
    sessions = {k: session(f) for k, f in files.items()}
    rows = []
    for split in ("val", "test"):
        images, labels = ds.splits[split]
        for condition in ("clean", "stain-shifted"):
            x = images if condition == "clean" else stain_shift(images, args.shift, 0)
            row = {"split": split, "condition": condition, "images": int(len(labels))}
            pj = np.asarray(predict_logits(eval_step, state, x, 64, placement)).argmax(-1)
            row["jax"] = float((pj == labels).mean())
            for kind, session in sessions.items():
                probs = np.concatenate([session.run(["probabilities"], {"images": x[i:i + 64]})[0]
                                        for i in range(0, len(x), 64)])
                row[kind] = float((probs.argmax(-1) == labels).mean())
                row[f"{kind}_agrees_with_jax"] = float((probs.argmax(-1) == pj).mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
    sizes = {k: os.path.getsize(f) for k, f in files.items()}
    # The edge runner's peak resident memory, in a process of its own, on 32 test images.
    folder = os.path.join(os.path.dirname(os.path.abspath(args.json)), "edge_images")
    os.makedirs(folder, exist_ok=True)
    from PIL import Image

    paths = []
    for i, image in enumerate(ds.splits["test"][0][:32]):
        paths.append(os.path.join(folder, f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    memory = {}
    for kind in ("fp32", "int8"):
        # GNU time forks from a small process: the child's peak is the runner's own (a child forked
        # from this process would count this process's pages until it execs).
        done = subprocess.run(["/usr/bin/time", "-f", "peak_kib %M", sys.executable, "-m", "jaxcell.edge", args.onnx,
                               "--precision", kind, *paths], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        kib = int(done.stderr.strip().splitlines()[-1].split()[-1])
        memory[kind] = {"peak_rss_mib": round(kib / 1024, 1), "images": len(paths)}
    result = {"workdir": os.path.abspath(args.workdir), "rows": rows, "file_bytes": sizes,
              "int8_size_ratio": sizes["int8"] / sizes["fp32"], "edge_peak_memory": memory}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
