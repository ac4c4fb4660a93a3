"""An HTTP load generator for OpenAI-style streaming completions, with `vllm bench serve`'s definitions.

Each request is a streamed `/v1/completions` call (prompt as token ids, `ignore_eos` so it produces
exactly `max_tokens` tokens, usage in the last chunk). Per request it records when it was sent, when
each content chunk arrived and how many tokens came back; from those:
  TTFT   request sent -> first streamed chunk with text
  ITL    gaps between consecutive content chunks (a chunk may carry several tokens)
  TPOT   (E2E - TTFT) / (output tokens - 1)
  tok/s  all output tokens / (first request sent -> last request done)
Arrivals are closed-loop (`concurrency` clients, each sending its next request when the last one is
done) or open-loop Poisson at `request_rate` per second (optionally capped at `concurrency` in flight).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Timing:
    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    end: float = 0.0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None


def lengths(n: int, median: int, dist: str, sigma: float, lo: int, hi: int, rng: random.Random) -> list[int]:
    """`n` lengths: all `median` (fixed) or lognormal with that median and shape `sigma` (as `bench
    batch` draws them), clipped to [lo, hi]."""
    if dist == "fixed":
        return [max(lo, min(hi, median))] * n
    return [int(max(lo, min(hi, round(rng.lognormvariate(float(np.log(median)), sigma))))) for _ in range(n)]


async def _one(client, url: str, prompt: list[int], max_tokens: int, temperature: float,
               headers: dict[str, str]) -> Timing:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t = Timing(sent=time.perf_counter())
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                t.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return t
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    t.error = str(event["error"].get("message"))
                if any(c.get("text") for c in event.get("choices") or ()):
                    t.chunks.append(time.perf_counter())
                if event.get("usage"):
                    t.output_tokens = event["usage"]["completion_tokens"]
    except Exception as e:  # a failed request is counted, not fatal
        t.error = f"{type(e).__name__}: {e}"
    t.end = time.perf_counter()
    return t


async def run_load(url: str, prompts: list[list[int]], outputs: list[int], concurrency: int | None,
                   request_rate: float | None, temperature: float = 0.0, api_key: str | None = None,
                   seed: int = 0) -> tuple[list[Timing], float]:
    """Send every prompt; returns the timings and the wall time from first send to last completion."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = concurrency or len(prompts)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    timeout = httpx.Timeout(None, connect=30.0)
    rng = random.Random(seed)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        if request_rate is None:  # closed loop: `concurrency` clients
            todo = iter(range(len(prompts)))
            results: list[Timing | None] = [None] * len(prompts)

            async def worker() -> None:
                for i in todo:
                    results[i] = await _one(client, url, prompts[i], outputs[i], temperature, headers)

            await asyncio.gather(*(worker() for _ in range(min(limit, len(prompts)))))
        else:  # open loop: Poisson arrivals, at most `limit` in flight
            gate = asyncio.Semaphore(limit)

            async def gated(i: int) -> Timing:
                async with gate:
                    return await _one(client, url, prompts[i], outputs[i], temperature, headers)

            tasks = []
            for i in range(len(prompts)):
                tasks.append(asyncio.create_task(gated(i)))
                await asyncio.sleep(rng.expovariate(request_rate))
            results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall


def summarize(timings: list[Timing], wall: float) -> dict:
    """The figures of one load level (DESIGN.md names where they exist; times in ms)."""
    ok = [t for t in timings if t.error is None and t.chunks]
    ttft = [1000 * t.ttft for t in ok]
    tpot = [1000 * (t.end - t.sent - t.ttft) / (t.output_tokens - 1) for t in ok if t.output_tokens > 1]
    itl = [1000 * (b - a) for t in ok for a, b in zip(t.chunks, t.chunks[1:])]
    e2e = [1000 * (t.end - t.sent) for t in ok]
    out_tokens = sum(t.output_tokens for t in ok)

    def pct(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)), 2) if values else None

    errors = [t.error for t in timings if t.error is not None]
    return {"requests": len(timings), "failed": len(errors), "first_error": errors[0] if errors else None,
            "output_tokens": out_tokens, "duration_s": round(wall, 3),
            "tok_per_s_total": round(out_tokens / wall, 1) if wall > 0 else None,
            "requests_per_s": round(len(ok) / wall, 2) if wall > 0 else None,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "tpot_p50_ms": pct(tpot, 50),
            "tpot_p99_ms": pct(tpot, 99), "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
            "e2e_p50_ms": pct(e2e, 50), "e2e_p99_ms": pct(e2e, 99)}
