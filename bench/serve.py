"""`jaxcell serve` under load, against offline `jaxcell predict` on the same images in the same run.

    python bench/serve.py --workdir runs/r [--images DIR] [--clients 16] [--requests 50] [--json out.json]

1. Offline: the code path of `jaxcell predict` (decode the files, one compiled program over batches of
   --offline-batch-size, the answers) over the very images the clients will send, timed after a
   warm-up; and the same with Grad-CAM overlays encoded as PNG as the server encodes them for every image.
2. Served: `jaxcell serve` in a subprocess on loopback; --clients threads each send --requests
   single-image POST /predict requests one after another. Errors (any status but 200, any exception)
   are counted; latency is per request, from send to parsed answer.

Bounded: every request has a timeout and the clients stop at --max-seconds. Throughput is images per
second; the ratio served / offline is the figure of merit (goal >= 0.8). A shared machine makes every
absolute figure noisy; both sides run in one invocation so that their ratio is fair.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def image_files(folder: str | None, count: int, tmp: str) -> list[str]:
    if folder:
        found = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if not found:
            raise SystemExit(f"no images in {folder}")
        step = max(1, len(found) // count)
        return found[::step][:count]
    from PIL import Image

    from jaxcell.data import synthetic

    images, _ = synthetic.make_smears(count, 224, seed=0)
    paths = []
    for i, image in enumerate(images):
        paths.append(os.path.join(tmp, f"smear{i:03d}.png"))
        Image.fromarray(np.asarray(image)).save(paths[-1])
    return paths


BOUNDARY = "jaxcell-bench-boundary"


def multipart(name: str, data: bytes) -> bytes:
    """A multipart/form-data body with one field "image" holding the file."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def health(port: int, timeout: float) -> dict:
    """GET /health of the server on loopback: its JSON; an error for anything but 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise ValueError(f"/health answered {response.status}: {body[:200]!r}")
        return json.loads(body)
    finally:
        connection.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def offline(workdir: str, paths: list[str], batch_size: int, cam: bool) -> dict:
    """`jaxcell predict`'s path over `paths`: images per second after one warm-up pass."""
    from jaxcell.data.images import load_images
    from jaxcell.explain import overlay
    from jaxcell.inference import Predictor
    from jaxcell.serve.app import png_data_url

    predictor = Predictor.load(workdir)

    def once():
        images = load_images(paths, predictor.image_size)
        out = predictor.outputs(images, batch_size, cam=cam)
        answers = predictor.answers(out["logits"], out.get("features"), out.get("detector_logits"))
        if cam:
            for image, m in zip(images, out["maps"]):  # the server's overlay and encoding
                png_data_url(overlay(image, m))
        return answers

    once()  # compiles
    start, cpu = time.perf_counter(), time.process_time()
    once()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"images": len(paths), "seconds": round(seconds, 3), "images_per_second": round(len(paths) / seconds, 2),
            "cpu_seconds": round(cpu, 2), "batch_size": batch_size, "grad_cam": cam}


STARTUP_SECONDS = 300.0  # compiling the server's programs cold takes about 35 s on two cores


def served(workdir: str, paths: list[str], clients: int, requests: int, batch_size: int, concurrent_batches: int,
           max_seconds: float) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "jaxcell.cli", "serve", "--workdir", workdir, "--port", str(port),
                               "--batch-size", str(batch_size), "--concurrent-batches", str(concurrent_batches)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    startup = []
    # A server that never says it listens is stopped after STARTUP_SECONDS, which ends the loop below.
    watchdog = threading.Timer(STARTUP_SECONDS, server.kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        for line in server.stdout:  # up when it says it listens
            startup.append(line.rstrip())
            if "listening on" in line:
                break
        else:
            raise SystemExit(f"jaxcell serve ended (or was stopped after {STARTUP_SECONDS:.0f} s) before "
                             "listening:\n" + "\n".join(startup))
        watchdog.cancel()  # it listens: the clients' own deadline bounds the rest
        for _ in range(100):
            try:
                health(port, timeout=2)
                break
            except (OSError, http.client.HTTPException, ValueError):  # not answering yet
                time.sleep(0.1)
        bodies = [multipart(os.path.basename(p), open(p, "rb").read()) for p in paths]
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + max_seconds

        def client(k: int):
            # The standard library's client on one kept-alive connection, the bodies encoded beforehand: the
            # load generator shares the machine's cores with the server, so it should cost it as little as it can.
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                for i in range(requests):
                    if time.monotonic() > deadline:
                        with lock:
                            errors.append("stopped at --max-seconds")
                        return
                    t = time.perf_counter()
                    try:
                        connection.request("POST", "/predict", bodies[(k * requests + i) % len(bodies)],
                                           {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
                        response = connection.getresponse()
                        text = response.read()
                        ok = response.status == 200 and len(json.loads(text)["results"]) == 1
                        problem = None if ok else f"HTTP {response.status}: {text[:200]!r}"
                    except Exception as error:  # noqa: BLE001  counted, not fatal
                        problem = repr(error)
                        connection.close()  # a fresh connection for the next request
                    with lock:
                        (errors.append(problem) if problem else latencies.append(time.perf_counter() - t))
            finally:
                connection.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        server_cpu, client_cpu = cpu_seconds(server.pid), time.process_time()
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        server_cpu, client_cpu = cpu_seconds(server.pid) - server_cpu, time.process_time() - client_cpu
        counts = health(port, timeout=5)
    finally:
        watchdog.cancel()
        server.terminate()
        server.wait(timeout=30)
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests_per_client": requests, "ok": len(latencies), "errors": len(errors),
            "first_errors": errors[:5], "seconds": round(seconds, 3),
            "images_per_second": round(len(latencies) / seconds, 2),
            "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
                           "max": round(float(ms.max()), 1)} if len(ms) else None,
            # Where the machine's time went: the clients share its cores with the server.
            "cpu_seconds": {"server": round(server_cpu, 2), "clients": round(client_cpu, 2)},
            "device_batches": counts["batches"], "mean_batch": round(counts["images"] / max(counts["batches"], 1), 2),
            "batch_size": batch_size, "concurrent_batches": concurrent_batches, "startup": startup}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--images", help="a folder of images (default: 64 synthetic smears at 224 px)")
    parser.add_argument("--distinct", type=int, default=64, help="distinct images, cycled over the requests")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--batch-size", type=int, default=16, help="the server's compiled batch")
    parser.add_argument("--concurrent-batches", type=int, default=2, help="the server's batches at once")
    parser.add_argument("--offline-batch-size", type=int, default=64, help="jaxcell predict's default")
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        distinct = image_files(args.images, args.distinct, tmp)
        total = args.clients * args.requests
        paths = [distinct[i % len(distinct)] for i in range(total)]  # the requests' images, in one list
        result = {"workdir": os.path.abspath(args.workdir), "images": args.images or "synthetic smears, 224 px",
                  "distinct_images": len(distinct)}
        result["offline"] = offline(args.workdir, paths, args.offline_batch_size, cam=False)
        result["offline_grad_cam"] = offline(args.workdir, paths, args.offline_batch_size, cam=True)
        result["served"] = served(args.workdir, distinct, args.clients, args.requests, args.batch_size,
                                  args.concurrent_batches, args.max_seconds)
    s = result["served"]["images_per_second"]
    result["ratio_to_offline"] = round(s / result["offline"]["images_per_second"], 3)
    result["ratio_to_offline_grad_cam"] = round(s / result["offline_grad_cam"]["images_per_second"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["served"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
