"""Reports of `jaxcell bench` -> the compact CPU table of docs/benchmarks.md (images/s and ratios).

    .venv/bin/python bench/cpu_table.py bench/results/cpu64_*.json
"""

import json
import sys

from jaxcell import bench


def table(paths: list[str]) -> str:
    report = bench.merge([json.load(open(p)) for p in paths])
    rows = [r for r in report["results"] if r["devices"] == 1]
    by = {(r["model"], r["image_size"], r["mode"], r["precision"], r["framework"]): r for r in rows}
    lines = ["| model | px | batch | mode | JAX img/s | torch img/s | torch.compile img/s | JAX / torch "
             "| JAX / torch.compile | Eigen / torch | before / torch | JAX GFLOP/s |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({k[:4] for k in by}, key=lambda k: (k[1], k[0], k[2] != "train", k[3]))
    for model, size, mode, precision in keys:
        get = lambda fw: by.get((model, size, mode, precision, fw))  # noqa: E731
        jax_row, torch_row, compiled, before = get("jax"), get("torch"), get("torch-compile"), get("jax-baseline")
        eigen = get("jax-eigen")
        ips = lambda r: f"{r['images_per_s']:.1f}" if r and r["images_per_s"] else "-"  # noqa: E731
        ratio = lambda a, b: (f"{a['images_per_s'] / b['images_per_s']:.2f}"  # noqa: E731
                              if a and b and a["images_per_s"] and b["images_per_s"] else "-")
        gflops = f"{jax_row['achieved_tflops'] * 1e3:.0f}" if jax_row and jax_row["achieved_tflops"] else "-"
        batch = (jax_row or torch_row or {}).get("batch_size", "-")
        lines.append(f"| {model} | {size} | {batch} | {mode} | {ips(jax_row)} | {ips(torch_row)} | {ips(compiled)} "
                     f"| {ratio(jax_row, torch_row)} | {ratio(jax_row, compiled)} | {ratio(eigen, torch_row)} "
                     f"| {ratio(before, torch_row)} "
                     f"| {gflops} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(sys.argv[1:]))
