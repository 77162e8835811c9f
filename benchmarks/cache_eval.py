"""Measure the semantic cache's parts: hit precision/recall across thresholds, index search latency, embedding latency.

    python benchmarks/cache_eval.py verifier [--embedder-dir DIR] [--max-false-hit-rate 0.01]  # labelled pairs
    python benchmarks/cache_eval.py index [--entries 100000] [--hnsw] # faiss flat vs our IVF partition (vs HNSW)
    python benchmarks/cache_eval.py embedding [--embedder-dir DIR]    # batch 1 and 8, 1 and 2 threads
    python benchmarks/cache_eval.py e2e --url 127.0.0.1:8001 [--url B] [--pairs natural_heldout]  # served llm models
    python benchmarks/cache_eval.py served --url 127.0.0.1:8001 --pairs independent_heldout  # every pair, served
    python benchmarks/cache_eval.py all --out results.json            # all but e2e

Without --embedder-dir the bundled MiniLM is exported (and checked) into a temporary folder first.

Verifier: the train splits ship with the package (a build derives its threshold on them): `builders/data/
cache_pairs_calibration.jsonl` (from templates, make_cache_pairs.py) and `builders/data/cache_pairs_natural_train.jsonl`
(written by hand). The held-out splits: `data/cache_pairs_heldout.jsonl` (templates), `data/
cache_pairs_natural_heldout.jsonl` (by hand, written with the natural train split before any rule was changed),
`data/cache_pairs_independent_heldout.jsonl` (300 pairs by a second separate writer; its twin by a first writer is the
train split `builders/data/cache_pairs_independent_train.jsonl`; both were given only the categories, never this
code or the other pairs) and the independently written `data/paraphrases.jsonl`, which no rule was developed on. Each holds pairs of a cached prompt `a`
and a new prompt `b`, label `hit` (serving a's answer is right) or `miss` (a near miss), with a category (`kind`; a
hand-written paraphrase also names its `rephrasing`: frame, contraction, politeness, order, inflection, synonym,
terse).
A pair "hits" as in the cache: cosine(a, b) >= threshold and the verifier accepts it. Precision = right hits / all
hits, recall = right hits / should-hit pairs, false-hit rate = 1 - precision. The threshold is derived on the train
splits only (`builders/cache_calibration.py`, as a build derives it), then each held-out split is reported at it, per
category and per rephrasing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tritonllm.builders.cache_calibration import calibrate, load_pairs, scored, served_at, threshold_table

DATA = Path(__file__).resolve().parent / "data" / "paraphrases.jsonl"
HELDOUT = DATA.with_name("cache_pairs_heldout.jsonl")  # written by make_cache_pairs.py, like the calibration pairs
NATURAL_HELDOUT = DATA.with_name("cache_pairs_natural_heldout.jsonl")
INDEPENDENT_HELDOUT = DATA.with_name("cache_pairs_independent_heldout.jsonl")
HELDOUT_SPLITS = {"heldout": HELDOUT, "natural_heldout": NATURAL_HELDOUT, "independent_heldout": INDEPENDENT_HELDOUT,
                  "paraphrases_jsonl": DATA}


def verifier_report(embedder, max_false_hit_rate: float) -> dict:
    """Derive the threshold on the calibration (train) split as a build does, then report the held-out split and
    paraphrases.jsonl at it, per category."""
    calibration = calibrate(embedder, max_false_hit_rate)
    threshold = calibration.similarity_threshold
    report = {"max_false_hit_rate": max_false_hit_rate, "threshold_from_train": threshold,
              "train": calibration.__dict__, "train_table": threshold_table(scored(embedder, load_pairs()))}
    for name, path in HELDOUT_SPLITS.items():
        pairs = load_pairs(path)
        cosine, should_hit, accepted = scored(embedder, pairs)
        report[name] = split_report(pairs, (cosine, should_hit, accepted), threshold)
        report[name]["cosine_only_at_threshold"] = served_at((cosine, should_hit, np.ones_like(accepted)), threshold)
    return report


def split_report(pairs: list[dict], scores: tuple[np.ndarray, np.ndarray, np.ndarray], threshold: float) -> dict:
    """What `scores` serve at `threshold`: in all, per category (`kind`) and per rephrasing, and the wrong hits."""
    cosine, should_hit, accepted = scores
    report = served_at(scores, threshold)
    for group in ("kind", "rephrasing"):
        report[f"by_{group}"] = {
            value: served_at((cosine[chosen], should_hit[chosen], accepted[chosen]), threshold)
            for value in sorted({pair[group] for pair in pairs if group in pair})
            for chosen in [np.array([pair.get(group) == value for pair in pairs])]}
    report["wrong_hit_pairs"] = [pair for pair, wrong in zip(pairs, (cosine >= threshold) & accepted & ~should_hit)
                                 if wrong]
    return report


def index_latency(entries: int, with_hnsw: bool, queries: int = 1000, dimension: int = 384) -> dict:
    """p50/p99 of one-query searches over `entries` clustered unit vectors (sentence embeddings cluster by topic);
    queries are near duplicates (cosine ~0.9) of stored vectors, as a cache lookup of a paraphrase would be."""
    import faiss

    from tritonllm.python_backends.semantic_cache import IVF_MIN_ENTRIES, PartitionIndex

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((2000, dimension)).astype(np.float32)
    stored = centers[rng.integers(0, len(centers), entries)]
    stored += 0.8 * rng.standard_normal(stored.shape).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    sources = rng.integers(0, entries, queries)
    probes = stored[sources] + 0.025 * rng.standard_normal((queries, dimension)).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)

    def measure(search) -> dict:
        latencies, found = [], 0
        for probe, source in zip(probes, sources):
            started = time.perf_counter()
            best = search(probe)
            latencies.append(time.perf_counter() - started)
            found += best == source
        milliseconds = np.array(latencies) * 1e3
        return {"p50_ms": float(np.percentile(milliseconds, 50)), "p99_ms": float(np.percentile(milliseconds, 99)),
                "recall_at_1": found / queries}

    results = {"entries": entries, "dimension": dimension, "query_cosine_median":
               float(np.median((probes * stored[sources]).sum(axis=1)))}
    flat = faiss.IndexFlatIP(dimension)
    flat.add(stored)
    results["faiss_flat_ip"] = measure(lambda probe: int(flat.search(probe.reshape(1, -1), 1)[1][0, 0]))
    partition = PartitionIndex(dimension, background=False)
    started = time.perf_counter()
    for entry_id, vector in enumerate(stored):
        partition.add([entry_id], vector.reshape(1, -1))
    results["partition_index"] = {"kind": partition.kind, "ivf_min_entries": IVF_MIN_ENTRIES,
                                  "build_s_incl_training": time.perf_counter() - started,
                                  **measure(lambda probe: partition.search(probe, 1)[0][0])}
    if with_hnsw:
        hnsw = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = 80, 64
        started = time.perf_counter()
        hnsw.add(stored)
        results["faiss_hnsw_flat_m32"] = {"build_s": time.perf_counter() - started, **measure(
            lambda probe: int(hnsw.search(probe.reshape(1, -1), 1)[1][0, 0]))}
    return results


def embedding_latency(embedder_dir: Path, repeats: int = 100) -> dict:
    from tritonllm.python_backends.embedding import Embedder

    sentences = [pair["b"] for pair in load_pairs(DATA)][:8]
    results = {}
    for threads in (1, 2):
        embedder = Embedder(embedder_dir, intra_op_threads=threads)
        for batch in (1, 8):
            embedder.embed(sentences[:batch])  # warm-up
            latencies = []
            for _ in range(repeats):
                started = time.perf_counter()
                embedder.embed(sentences[:batch])
                latencies.append(time.perf_counter() - started)
            milliseconds = np.array(latencies) * 1e3
            results[f"threads{threads}_batch{batch}"] = {"p50_ms": float(np.percentile(milliseconds, 50)),
                                                         "p99_ms": float(np.percentile(milliseconds, 99))}
    return results


def end_to_end_latency(urls: list[str], model: str, requests: int, max_tokens: int, pairs: Path) -> dict:
    """Streaming gRPC requests to the front model of each server in `urls` (side by side: each request goes to every
    server in turn, the order rotating): `requests` distinct questions (misses: a fresh tenant, so nothing is cached
    yet), the same questions again (exact hits), then a paraphrase of each (hits or misses by the server's threshold
    and verifier; the should-hit pairs of `pairs`). Time to the first response and to the last, per kind, and of the
    hits alone; paraphrase hits also apart by how they were found: `same_reading` (the verifier's normal form, by
    hash: similarity 1.0) or `embedded` (the vector index, similarity < 1)."""
    import uuid

    from tritonllm.client.api import GenerationParams, LLMClient

    clients = [LLMClient(url, "grpc", model=model) for url in urls]
    params = GenerationParams(max_tokens=max_tokens, apply_chat_template=True, tenant=f"bench-{uuid.uuid4().hex}")
    should_hit = [pair for pair in load_pairs(pairs) if pair["label"] == "hit"]
    questions = list(dict.fromkeys(pair["a"] for pair in should_hit))[:requests]
    paraphrases = [next(pair["b"] for pair in should_hit if pair["a"] == question) for question in questions]
    results = {url: {"pairs": pairs.name} for url in urls}
    for kind, prompts in (("miss", questions), ("exact_hit", questions), ("paraphrase", paraphrases)):
        first = {url: [] for url in urls}
        total = {url: [] for url in urls}
        hit_totals = {url: {"same_reading": [], "embedded": []} for url in urls}
        for position, prompt in enumerate(prompts):
            for turn in range(len(urls)):
                chosen = (position + turn) % len(urls)
                url = urls[chosen]
                started = time.perf_counter()
                events = list(clients[chosen].events(prompt, params, stream=True))
                first[url].append(events[0].received_at - started)
                total[url].append(time.perf_counter() - started)
                if events[0].cache_hit:
                    path = "same_reading" if events[0].cache_similarity == 1.0 else "embedded"
                    hit_totals[url][path].append(total[url][-1])
        for url in urls:
            paths = hit_totals[url] if kind == "paraphrase" else {}
            hits = hit_totals[url]["same_reading"] + hit_totals[url]["embedded"]
            results[url][kind] = {
                "requests": len(prompts), "cache_hits": len(hits),
                **{f"{path}_hits": len(values) for path, values in paths.items()},
                **{f"{name}_{q}_ms": float(np.percentile(np.array(values) * 1e3, int(q[1:])))
                   for name, values in (("first_response", first[url]), ("total", total[url]), ("hit_total", hits),
                                        *((f"{path}_hit_total", values) for path, values in paths.items()))
                   if values for q in ("p50", "p95")}}
    return results


def served_pairs(url: str, model: str, max_tokens: int, pairs: Path) -> dict:
    """Every labelled pair of `pairs` through a served front model, as a new user would check it: `a` is asked (it
    is answered and cached), then `b`; `b` answered from the cache counts as a hit, right for a paraphrase and wrong
    for a near miss. Each pair has a fresh tenant of its own, so that only `a` can answer `b` (in one tenant the
    cached "What is the capital of Australia?" of one pair rightly answers the near miss "What's the capital of
    Australia?" of another, which the label would count as wrong). Precision and recall per category as `verifier`
    reports them, and the end-to-end time of `b`'s answer, hits and misses apart."""
    import uuid

    from tritonllm.client.api import GenerationParams, LLMClient

    client = LLMClient(url, "grpc", model=model)
    labelled = load_pairs(pairs)
    served, seconds = [], []
    run = uuid.uuid4().hex
    for number, pair in enumerate(labelled):
        params = GenerationParams(max_tokens=max_tokens, apply_chat_template=True, tenant=f"served-{run}-{number}")
        list(client.events(pair["a"], params, stream=True))
        started = time.perf_counter()
        events = list(client.events(pair["b"], params, stream=True))
        seconds.append(time.perf_counter() - started)
        served.append(bool(events[0].cache_hit))
    served, seconds = np.array(served), np.array(seconds)
    should_hit = np.array([pair["label"] == "hit" for pair in labelled])
    # the server applied its own floor already: every pair counts as above it
    report = {"pairs": pairs.name, **split_report(labelled, (np.ones(len(labelled)), should_hit, served), 0.0)}
    for name, chosen in (("hit", served), ("miss", ~served)):
        if chosen.any():
            report[f"{name}_total_p50_ms"] = float(np.percentile(seconds[chosen] * 1e3, 50))
            report[f"{name}_total_p95_ms"] = float(np.percentile(seconds[chosen] * 1e3, 95))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["verifier", "index", "embedding", "e2e", "served", "all"])
    parser.add_argument("--embedder-dir", type=Path, help="an exported embedder folder (default: export one now)")
    parser.add_argument("--max-false-hit-rate", type=float, default=0.01, help="verifier: the error budget")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--hnsw", action="store_true", help="also build faiss HNSW (minutes at 100k on 2 cores)")
    parser.add_argument("--url", action="append", help="e2e: gRPC address of a server (default 127.0.0.1:8001); "
                                                       "several are measured side by side")
    parser.add_argument("--model", default="llm", help="e2e: the front model's name")
    parser.add_argument("--requests", type=int, default=30, help="e2e: distinct prompts (each asked twice)")
    parser.add_argument("--max-tokens", type=int, default=32, help="e2e: tokens per answer")
    parser.add_argument("--pairs", choices=sorted(HELDOUT_SPLITS), default="natural_heldout",
                        help="e2e: the held-out split whose should-hit pairs are asked; served: whose pairs")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        embedder_dir = args.embedder_dir
        if embedder_dir is None and args.what in ("verifier", "embedding", "all"):
            from tritonllm.builders.embedder import export_embedder

            embedder_dir = export_embedder(Path(scratch) / "embedder")
        results = {}
        if args.what in ("verifier", "all"):
            from tritonllm.python_backends.embedding import Embedder

            results["verifier"] = verifier_report(Embedder(embedder_dir, intra_op_threads=0), args.max_false_hit_rate)
        if args.what in ("embedding", "all"):
            results["embedding"] = embedding_latency(embedder_dir)
        if args.what in ("index", "all"):
            results["index"] = index_latency(args.entries, args.hnsw)
        if args.what == "e2e":
            results["e2e"] = end_to_end_latency(args.url or ["127.0.0.1:8001"], args.model, args.requests,
                                                args.max_tokens, HELDOUT_SPLITS[args.pairs])
        if args.what == "served":
            results["served"] = served_pairs((args.url or ["127.0.0.1:8001"])[0], args.model, args.max_tokens,
                                             HELDOUT_SPLITS[args.pairs])
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
