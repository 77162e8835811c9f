"""Soak a served repository on demand: mixed traffic for a while, then what leaked.

Worker threads loop over a mix of requests through the front model `llm` (cache bypassed, so every one reaches the
engine): streams read to the end, streams the client cancels after a few pieces, whole answers, and bad inputs that
must be refused. At the end it reports outcomes by kind, errors that were not expected, the memory of tritonserver
and its stubs before and after, the engine's running/waiting gauges once traffic stopped (a cancelled stream that
kept generating shows here), and, after a normal stop, processes of the server's group still alive.

  python benchmarks/soak.py --repository DIR [--minutes 10] [--workers 8]
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from tritonllm.client.api import GenerationError, GenerationParams, LLMClient
from tritonllm import reaper
from tritonllm.server import TritonServer

BAD_INPUTS = ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 2.0}, {"cache": "sometimes"})


def group_rss_kib(group: int) -> int:
    total = 0
    for pid in reaper.group_members(group):
        try:
            total += int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                              if line.startswith("VmRSS:")).split()[1])
        except (OSError, StopIteration):
            continue
    return total


def engine_gauges(server: TritonServer) -> dict[str, float]:
    text = requests.get(server.endpoints.metrics_url, timeout=10).text
    return {name: sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))
            for name in ("tritonllm_requests_running", "tritonllm_requests_waiting")}


def worker(url: str, stop: threading.Event, seed: int, outcomes: Counter, surprises: list[str]) -> None:
    rng = random.Random(seed)
    client = LLMClient(url, "grpc", model="llm", timeout=120)
    while not stop.is_set():
        kind = rng.choice(("stream", "cancel", "whole", "bad"))
        params = GenerationParams(max_tokens=rng.randint(4, 96), cache="bypass", tenant=f"soak-{seed}",
                                  apply_chat_template=True)
        prompt = f"Soak question {rng.randrange(10**6)}: tell me about {rng.choice(('tea', 'rivers', 'gpus'))}."
        try:
            if kind == "stream":
                list(client.stream(prompt, params))
            elif kind == "cancel":
                pieces = client.stream(prompt, GenerationParams(**{**vars(params), "max_tokens": 300}))
                for _ in range(rng.randint(1, 3)):
                    next(pieces, None)
                pieces.close()
            elif kind == "whole":
                client.generate(prompt, params)
            else:
                bad = rng.choice(BAD_INPUTS)
                try:
                    client.generate(prompt, GenerationParams(**{**vars(params), **bad}))
                    surprises.append(f"accepted bad input {bad}")
                except GenerationError:
                    pass
            outcomes[kind] += 1
        except Exception as error:  # anything but a refused bad input is a finding
            surprises.append(f"{kind}: {type(error).__name__}: {error}"[:300])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()

    server = TritonServer(args.repository, log_file=Path("bench-results") / "soak-tritonserver.log").start()
    outcomes: Counter = Counter()
    surprises: list[str] = []
    try:
        rss_start = group_rss_kib(server.process.pid)
        stop = threading.Event()
        threads = [threading.Thread(target=worker, args=(server.endpoints.grpc_url, stop, seed, outcomes, surprises))
                   for seed in range(args.workers)]
        for thread in threads:
            thread.start()
        time.sleep(args.minutes * 60)
        stop.set()
        for thread in threads:
            thread.join()
        time.sleep(2.0)  # a few engine steps and a metrics flush after the last request
        report = {"outcomes": dict(outcomes), "surprises": len(surprises), "first_surprises": surprises[:10],
                  "rss_kib_start": rss_start, "rss_kib_end": group_rss_kib(server.process.pid),
                  "engine_after_traffic": engine_gauges(server)}
    finally:
        group = server.process.pid
        server.stop()
    report["group_processes_left"] = len(reaper.group_members(group))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
