"""Serving benchmark: throughput and latency of the HTTP server at 1, 8 and 32 clients.

Each preset (``tiny`` and ``tiny_dense`` by default: Spark against dense at equal parameter
count) is served by its own process on a free loopback port: random weights built in the decode
layout, a tokenizer trained on the bundled corpus, the batching engine with ``--slots`` rows,
compiled before the clock starts. This process runs the clients: each sends its requests one
after another (streamed, greedy, prompts cut from the corpus), and all clients of a level run at
once. Every level runs ``--rounds`` times with the presets alternating (all servers stay up,
idle while another is measured), so machine noise hits them alike. Throughput is generated
tokens over the summed wall time of the rounds; latency is per request, from sending it to the
last chunk, and the time to the first chunk, with percentiles over every request of the level
(with a few dozen to a few hundred requests, p99 is close to the slowest one).

    python benchmarks/serve.py                    # about 2 minutes on 2 CPU cores
    python benchmarks/serve.py --clients 1 8 --requests 4 16 --max-tokens 16

Writes ``benchmarks/results/serve.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pathlib
import platform
import random
import time

import httpx
import numpy as np
import portpicker

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def serve_random_model(preset: str, port: int, slots: int, max_tokens: int) -> None:
    """Runs the server for ``preset`` with random weights until the process is terminated."""
    import uvicorn

    from configs import get_model_config
    from sparse_jax.data.pipeline import DataConfig, load_documents
    from sparse_jax.data.tokenizer import Tokenizer
    from sparse_jax.model.weights import random_params
    from sparse_jax.serve.app import ServerSettings, create_app
    from sparse_jax.serve.engine import Engine

    cfg = get_model_config(preset)
    tokenizer = Tokenizer.train(load_documents(DataConfig()), cfg.vocab_size)
    engine = Engine(cfg, random_params(cfg, seed=0), slots=slots).start(warmup=True)
    settings = ServerSettings(preset, max_tokens_limit=max_tokens)
    app = create_app(engine, tokenizer, settings)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def prompts(count: int, seed: int = 0) -> list[str]:
    """Openings of random corpus chapters, 4 to 16 words long."""
    from sparse_jax.data.pipeline import DataConfig, load_documents

    docs = load_documents(DataConfig())
    rng = random.Random(seed)
    return [" ".join(rng.choice(docs).split()[: rng.randint(4, 16)]) for _ in range(count)]


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    """(latency s, time to first chunk s, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - start, first, tokens


async def run_level(url: str, preset: str, texts: list[str], clients: int, max_tokens: int):
    """All ``texts`` as requests from ``clients`` concurrent clients: wall time, per request."""
    per_client = [texts[i::clients] for i in range(clients)]
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def session(own: list[str]) -> list[tuple[float, float, int]]:
            out = []
            for text in own:
                body = {
                    "model": preset,
                    "prompt": text,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                out.append(await one_request(client, body))
            return out

        start = time.perf_counter()
        sessions = await asyncio.gather(*(session(own) for own in per_client))
        wall = time.perf_counter() - start
    done = [r for s in sessions for r in s]
    return {"preset": preset, "clients": clients, "wall_s": wall, "_requests": done}


def wait_healthy(url: str, process: multiprocessing.Process, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError(f"the server process exited with code {process.exitcode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become healthy")


def start_server(preset: str, args: argparse.Namespace) -> tuple[str, multiprocessing.Process]:
    port = portpicker.pick_unused_port()
    process = multiprocessing.get_context("spawn").Process(
        target=serve_random_model, args=(preset, port, args.slots, args.max_tokens), daemon=True
    )
    process.start()
    return f"http://127.0.0.1:{port}", process


def merge(rounds: list[dict]) -> dict:
    """One row from several rounds of a level: totals, and percentiles over every request."""
    requests = [r for one in rounds for r in one.pop("_requests")]
    latency, first = np.array([r[0] for r in requests]), np.array([r[1] for r in requests])
    tokens, wall = sum(r[2] for r in requests), sum(one["wall_s"] for one in rounds)
    return {
        "preset": rounds[0]["preset"],
        "clients": rounds[0]["clients"],
        "rounds": len(rounds),
        "requests": len(requests),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(float(np.percentile(latency, 50)), 3),
        "latency_p99_s": round(float(np.percentile(latency, 99)), 3),
        "first_chunk_p50_s": round(float(np.percentile(first, 50)), 3),
        "first_chunk_p99_s": round(float(np.percentile(first, 99)), 3),
    }


def bench(args: argparse.Namespace, texts: list[str]) -> list[dict]:
    """Every level, round-robin over the presets (all servers up, idle while not measured)."""
    servers = {preset: start_server(preset, args) for preset in args.presets}
    try:
        for url, process in servers.values():
            wait_healthy(url, process)
        for preset, (url, _) in servers.items():  # warm the HTTP path
            asyncio.run(run_level(url, preset, texts[:4], 4, args.max_tokens))
        rows = []
        for clients, requests in zip(args.clients, args.requests, strict=True):
            rounds: dict[str, list[dict]] = {preset: [] for preset in servers}
            for _ in range(args.rounds):
                for preset, (url, _) in servers.items():
                    level = run_level(url, preset, texts[:requests], clients, args.max_tokens)
                    rounds[preset].append(asyncio.run(level))
            for preset in servers:
                rows.append(merge(rounds[preset]))
                print(json.dumps(rows[-1]), flush=True)
        for preset, (url, _) in servers.items():
            status = httpx.get(f"{url}/health").json()
            rows.append({"preset": preset, "server_status": status})
        return rows
    finally:
        for _, process in servers.values():
            process.terminate()
            process.join(timeout=60)


def table(rows: list[dict]) -> str:
    lines = [
        "| preset | clients | requests | tokens/s | latency p50 (s) | latency p99 (s) "
        "| first chunk p50 (s) | first chunk p99 (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "clients" not in r:
            continue
        lines.append(
            f"| {r['preset']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} "
            f"| {r['latency_p50_s']:.3f} | {r['latency_p99_s']:.3f} "
            f"| {r['first_chunk_p50_s']:.3f} | {r['first_chunk_p99_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "tiny_dense"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", nargs="+", type=int, default=[8, 32, 64], help="per round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per level, presets alternating"
    )
    parser.add_argument("--slots", type=int, default=32, help="engine batch rows")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = parser.parse_args()
    if len(args.clients) != len(args.requests):
        parser.error("give one --requests count per --clients level")
    texts = prompts(max(args.requests))
    load_before = [round(x, 2) for x in os.getloadavg()]  # other work on the machine
    rows = bench(args, texts)
    import jax  # only for the report: the servers ran in their own processes

    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": multiprocessing.cpu_count(),
            "load_average_before": load_before,
            "backend": jax.default_backend(),
            "jax": jax.__version__,
        },
        "settings": {
            "slots": args.slots,
            "max_tokens": args.max_tokens,
            "weights": "random (model layout)",
            "sampling": "greedy, streamed",
            "rounds": args.rounds,
        },
        "results": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
