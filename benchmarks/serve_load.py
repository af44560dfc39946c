"""Load test of ``hcx-extend serve``: dynamic batching against the same requests sent one at a time.

The model is the embedded SmolLM2-135M-Instruct extended with ``imu_modality("imu")`` (a fresh,
untrained encoder: throughput does not depend on its weights), saved as a run folder whose base is
the embedded GGUF. A real server process serves it on a free loopback port. Every request carries
one 10 s IMU recording (100 steps x 6 channels, synthetic) before the question "What activity is the
person doing?", greedy, ``max_tokens`` 16; every other request streams (``stream: true``).

In one run, against one server process:

1. one at a time: the 128 requests, each sent after the previous answer came back;
2. concurrent: the same 128 requests from 32 clients x 4 requests each (each client sends its next
   request when its previous one is answered);
3. soak: 500 more requests from 32 clients, the server's resident memory (VmRSS) read every 50.

It prints a table (errors, wall time, requests/s, p50/p95 latency, mean batch size from /health) and
the throughput ratio concurrent / one at a time, the RSS first/last/max over the soak, and how many
concurrent answers equal the one-at-a-time answer to the same request (batched greedy decoding pads
prompts on the left; it should not change answers). Written to benchmarks/results/serve_load.txt.

    python benchmarks/serve_load.py                  # about 3 minutes on 2 CPU cores
    python benchmarks/serve_load.py --threads 1      # torch threads in the server (default: torch's)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai

from hcx_extend.checkpoint import extend
from hcx_extend.presets import imu_modality, smollm2_gguf_path
from hcx_extend.runs import save_run

MODEL = "smollm2-imu"
QUESTION = "What activity is the person doing?"
RESULTS = Path(__file__).parent / "results" / "serve_load.txt"


def build_run(folder: Path) -> Path:
    """SmolLM2 + a fresh imu modality, saved as a run folder (the encoder and projector; the base is the GGUF)."""
    base = smollm2_gguf_path()
    extended = extend(base, [imu_modality("imu")])
    return save_run(extended.model, folder / "checkpoint", base=base, components=["imu_model", "imu_projector"],
                    tokenizer=extended.tokenizer, strategy="new-encoder")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.load(response)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def recording(seed: int) -> list[list[float]]:
    """10 s at 10 Hz: a few sines of random frequency and phase per channel, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(100) / 10
    values = np.sin(2 * np.pi * rng.uniform(0.2, 3, 6) * t[:, None] + rng.uniform(0, 6.3, 6)) * rng.uniform(0.5, 5, 6)
    return (values + rng.normal(0, 0.3, values.shape)).round(4).tolist()


def make_request(seed: int) -> dict:
    content = [{"type": "input_sensor", "input_sensor": {"modality": "imu", "data": recording(seed)}},
               {"type": "text", "text": QUESTION}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 16, "temperature": 0}


def send(client: openai.OpenAI, request: dict, stream: bool) -> tuple[float, str]:
    """(latency in s, answer); raises on any error."""
    started = time.perf_counter()
    if stream:
        chunks = client.chat.completions.create(model=MODEL, stream=True, **request)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = client.chat.completions.create(model=MODEL, **request).choices[0].message.content
    return time.perf_counter() - started, text


class Phase:
    """Requests sent by ``clients`` threads, each sending its share one after another."""

    def __init__(self, name: str, url: str, client: openai.OpenAI, requests: list[dict], clients: int,
                 on_done=None):
        self.name, self.url, self.client, self.requests, self.clients = name, url, client, requests, clients
        self.latencies: list[float] = []
        self.answers: dict[int, str] = {}
        self.errors: list[str] = []
        self.on_done = on_done
        self.lock = threading.Lock()

    def run(self) -> "Phase":
        before = health(self.url)
        started = time.perf_counter()
        with ThreadPoolExecutor(self.clients) as pool:
            list(pool.map(self._client, range(self.clients)))
        self.wall = time.perf_counter() - started
        after = health(self.url)
        batches = after["batches"] - before["batches"]
        self.mean_batch = (after["requests"] - before["requests"]) / batches if batches else 0.0
        return self

    def _client(self, number: int) -> None:
        for index in range(number, len(self.requests), self.clients):
            try:
                latency, text = send(self.client, self.requests[index], stream=index % 2 == 1)
            except Exception as error:  # noqa: BLE001 - counted and reported
                with self.lock:
                    self.errors.append(f"request {index}: {type(error).__name__}: {error}")
                continue
            with self.lock:
                self.latencies.append(latency)
                self.answers[index] = text
                done = len(self.latencies) + len(self.errors)
            if self.on_done:
                self.on_done(done)

    def row(self) -> str:
        ordered = sorted(self.latencies) or [float("nan")]
        p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
        return (f"{self.name:<16} {len(self.requests):>8} {self.clients:>7} {len(self.errors):>6} {self.wall:>8.1f} "
                f"{len(self.latencies) / self.wall:>7.2f} {statistics.median(ordered):>8.2f} {p95:>8.2f} "
                f"{self.mean_batch:>10.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--soak", type=int, default=500, help="requests of the memory soak")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: torch's)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        print("building the model (SmolLM2-135M-Instruct + a fresh imu modality) ...", flush=True)
        checkpoint = build_run(Path(folder))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "hcx_extend.cli", "serve", str(checkpoint), "--port", str(port),
                   "--model-name", MODEL, "--max-batch-size", str(args.clients), "--max-queue", "256",
                   "--log-level", "warning"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        log = Path(folder) / "server.log"
        with log.open("w") as output:
            server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    health(url)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the server did not start:\n{log.read_text()}")
                    time.sleep(0.5)
            client = openai.OpenAI(api_key="none", base_url=f"{url}/v1", max_retries=0, timeout=600)
            for seed in (-1, -2):  # warm-up
                send(client, make_request(10_000 + seed), stream=False)

            total = args.clients * args.per_client
            requests = [make_request(seed) for seed in range(total)]
            print(f"one at a time: {total} requests ...", flush=True)
            single = Phase("one at a time", url, client, requests, clients=1).run()
            print(f"concurrent: {args.clients} clients x {args.per_client} ...", flush=True)
            concurrent = Phase("concurrent", url, client, requests, clients=args.clients).run()

            print(f"soak: {args.soak} requests, RSS every 50 ...", flush=True)
            rss = [(0, rss_mb(server.pid))]
            marks = set(range(50, args.soak + 1, 50))
            rss_lock = threading.Lock()

            def sample(done: int) -> None:
                if done in marks:
                    with rss_lock:
                        rss.append((done, rss_mb(server.pid)))

            soak_requests = [make_request(1_000 + seed) for seed in range(args.soak)]
            soak = Phase("soak", url, client, soak_requests, clients=args.clients, on_done=sample).run()
            rss.sort()
            final = health(url)
        finally:
            server.terminate()
            server.wait(120)

    same = sum(concurrent.answers.get(i) == single.answers.get(i) for i in range(total))
    ratio = (len(concurrent.latencies) / concurrent.wall) / (len(single.latencies) / single.wall)
    errors = single.errors + concurrent.errors + soak.errors
    lines = [
        f"hcx-extend serve load test: {MODEL} (SmolLM2-135M-Instruct + imu, untrained encoder), one 100-step IMU "
        f"recording + question per request, greedy, max_tokens 16, every other request streamed; server torch threads "
        f"{args.threads or 'default'}; {os.cpu_count()} CPU cores",
        "",
        f"{'phase':<16} {'requests':>8} {'clients':>7} {'errors':>6} {'wall s':>8} {'req/s':>7} {'p50 s':>8} "
        f"{'p95 s':>8} {'mean batch':>10}",
        single.row(),
        concurrent.row(),
        soak.row(),
        "",
        f"throughput, concurrent / one at a time: {ratio:.2f}x",
        f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]),
        f"concurrent answers equal to the one-at-a-time answer to the same request: {same}/{total}",
        f"server RSS over the soak (MB, after n requests): " + ", ".join(f"{n}: {mb:.0f}" for n, mb in rss),
        f"RSS first/last: {rss[0][1]:.0f} MB / {rss[-1][1]:.0f} MB ({rss[-1][1] - rss[0][1]:+.0f} MB), "
        f"max {max(mb for _, mb in rss):.0f} MB",
        f"batch sizes over the whole run (size: batches): {final['batch_sizes']}",
    ]
    report = "\n".join(lines)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report + "\n")
    print(f"wrote {args.output}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
