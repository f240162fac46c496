"""The SDK workload of the LangGraph comparison (bench/run.py --langgraph).

Drives a LangGraph Agent Server API, Bulkhead's or LangGraph's own, with the
real `langgraph-sdk` (async client), N concurrent workers, a fixed time per
phase after a short warm-up:

- `wait`:   per iteration `threads.create()`, then `runs.wait(thread,
            assistant, input={"messages": [one user message]})`;
- `stream`: per iteration `threads.create()`, then `runs.stream(...)` with
            `stream_mode="values"`, read to its end.

Every answer is checked (the last message must be the AI's `echo: <message>`,
what both servers answer: Bulkhead's mock model and the echo graph); a wrong
answer or an exception counts as an error. Prints one JSON object: per phase
iterations per second, and p50/p90/p99/max of the iteration (thread + run)
and of the run call alone, in milliseconds; the client's own CPU time, to
tell when the load generator is the limit.

    python workload.py --url http://127.0.0.1:2024 --assistant agent \
        --concurrency 16 --seconds 10
"""

import argparse
import asyncio
import json
import resource
import sys
import time

from langgraph_sdk import get_client

MESSAGE = "hello"
EXPECTED = f"echo: {MESSAGE}"


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def last_message_text(values):
    messages = (values or {}).get("messages") or []
    if not messages:
        return None
    last = messages[-1]
    content = last.get("content")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return last.get("type"), content


async def one_wait(client, assistant):
    started = time.perf_counter()
    thread = await client.threads.create()
    run_started = time.perf_counter()
    values = await client.runs.wait(
        thread["thread_id"], assistant,
        input={"messages": [{"role": "user", "content": MESSAGE}]},
    )
    done = time.perf_counter()
    if last_message_text(values) != ("ai", EXPECTED):
        raise ValueError(f"unexpected answer: {json.dumps(values)[:300]}")
    return done - started, done - run_started


async def one_stream(client, assistant):
    started = time.perf_counter()
    thread = await client.threads.create()
    run_started = time.perf_counter()
    last_values, events = None, 0
    async for part in client.runs.stream(
        thread["thread_id"], assistant,
        input={"messages": [{"role": "user", "content": MESSAGE}]},
        stream_mode="values",
    ):
        events += 1
        if part.event == "values":
            last_values = part.data
        elif part.event == "error":
            raise ValueError(f"error event: {json.dumps(part.data)[:300]}")
    done = time.perf_counter()
    if last_message_text(last_values) != ("ai", EXPECTED):
        raise ValueError(f"unexpected last values after {events} events: {json.dumps(last_values)[:300]}")
    return done - started, done - run_started


async def phase(client, assistant, step, concurrency, seconds, warmup):
    """Runs `step` in `concurrency` workers for warmup + seconds; only the
    iterations that start and end inside the measured window count."""
    samples, errors, first_errors, completed = [], 0, [], 0
    begin = time.perf_counter()
    measure_from = begin + warmup
    stop_at = measure_from + seconds

    async def worker():
        nonlocal errors, completed
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                return
            try:
                iteration, run = await step(client, assistant)
            except Exception as error:  # noqa: BLE001 - counted and reported
                if started >= measure_from:
                    errors += 1
                    if len(first_errors) < 3:
                        first_errors.append(f"{type(error).__name__}: {error}"[:500])
                continue
            completed += 1
            if started >= measure_from and started + iteration <= stop_at:
                samples.append((iteration, run))

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    # The window's length: from the start of the measured window to its end
    # (iterations still running at the end are not counted, nor is their time).
    iterations = [s[0] * 1000 for s in samples]
    runs = [s[1] * 1000 for s in samples]
    client_cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "iterations": len(samples),
        "completed_with_warmup": completed,
        "errors": errors,
        "first_errors": first_errors,
        "rps": len(samples) / seconds,
        "p50_ms": percentile(iterations, 50),
        "p90_ms": percentile(iterations, 90),
        "p99_ms": percentile(iterations, 99),
        "max_ms": max(iterations) if iterations else None,
        "run_p50_ms": percentile(runs, 50),
        "run_p99_ms": percentile(runs, 99),
        "client_cpu_s": client_cpu,
        "client_cpu_share": client_cpu / (time.perf_counter() - begin),
    }


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--assistant", required=True, help="assistant id or graph id (agent, default, ...)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase")
    parser.add_argument("--phases", default="wait,stream")
    args = parser.parse_args()

    client = get_client(url=args.url, api_key=args.api_key)
    steps = {"wait": one_wait, "stream": one_stream}
    report = {"url": args.url, "assistant": args.assistant, "message": MESSAGE, "phases": {}}
    try:
        for name in args.phases.split(","):
            report["phases"][name] = await phase(
                client, args.assistant, steps[name], args.concurrency, args.seconds, args.warmup)
    finally:
        await client.aclose()
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    try:
        import uvloop  # in both venvs' requirements (langgraph-api's); the client is the same either way
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
