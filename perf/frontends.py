"""The front ends side by side: one `symphony serve` (1 shard on CPU 0, the clients on CPU 1),
the same model and the same closed-loop load through the native protocol, KServe v2 over
HTTP and over gRPC, one after the other in one run; for each, the requests a second the
client got through and the service's CPU time (user + system, /proc) per request.

Usage: python perf/frontends.py SYMPHONY_BINARY [SECONDS] [CONNECTIONS]
The clients: HTTP is raw keep-alive HTTP/1.1 on CONNECTIONS connections (default 512) in one
asyncio loop, JSON tensors; gRPC is tritonclient's stream with GRPC_WINDOW requests in flight;
the native one is `symphony loadgen` (open loop, at the rate the HTTP run reached, so the two
compare at one rate). All three are Python-bound or paced: the rates say what these clients
reach, the CPU per request what each front end costs the service.
"""

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import time

MODEL = "f0"
# Requests in flight: deferral holds each request for most of its SLO (100 ms here), so a
# closed loop needs hundreds in flight to reach a rate where the front end's own cost shows.
GRPC_WINDOW = 512
BODY = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "UINT8", "shape": [1, 16], "data": list(range(16))}]})


def started_addrs(log_path):
    """Waits (up to 10 s) for `serve`'s start-up lines in its log; returns its native, HTTP
    and gRPC addresses (plain or TLS)."""
    text = ""
    for _ in range(100):
        text = open(log_path).read()
        if "KServe v2 over gRPC at" in text:
            break
        time.sleep(0.1)
    native = re.search(r" on (127\.0\.0\.1:\d+);", text).group(1)
    http_addr = re.search(r"https?://(127\.0\.0\.1:\d+)/v2", text).group(1)
    grpc_addr = re.search(r"grpcs?://(127\.0\.0\.1:\d+)", text).group(1)
    return native, http_addr, grpc_addr


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def http_connection(host, port, end, counts):
    import asyncio

    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\n\r\n{BODY}"
    ).encode()
    while time.time() < end:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        await reader.readexactly(length)
        counts[0] += 1
        counts[1] += head.startswith(b"HTTP/1.1 200")
    writer.close()


def run_http(addr, seconds, connections):
    """`connections` keep-alive connections in one event loop, each a request at a time."""
    import asyncio

    host, port = addr.split(":")
    counts = [0, 0]

    async def all_of_them():
        end = time.time() + seconds
        await asyncio.gather(*(http_connection(host, int(port), end, counts) for _ in range(connections)))

    asyncio.run(all_of_them())
    return counts[0], counts[1]


def run_grpc(addr, seconds):
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=addr)
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error is None))
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "UINT8")
    tensor.set_data_from_numpy(np.arange(16, dtype=np.uint8).reshape(1, 16))
    window, sent, done, ok = GRPC_WINDOW, 0, 0, 0
    end = time.time() + seconds
    while sent < window:
        client.async_stream_infer(MODEL, [tensor])
        sent += 1
    while done < sent:
        ok += answers.get(timeout=30)
        done += 1
        if time.time() < end:
            client.async_stream_infer(MODEL, [tensor])
            sent += 1
    client.stop_stream()
    return done, ok


def main():
    binary = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5
    connections = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workload = os.path.join(root, "perf/workloads/frontdoor-1000m.yaml")
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    serve = subprocess.Popen(
        [binary, "serve", "--workload", workload, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
         "--grpc", "127.0.0.1:0", "--metrics", "off", "--shards", "1", "--cpus", "0"],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    os.sched_setaffinity(0, {1})
    try:
        native, http_addr, grpc_addr = started_addrs(log.name)
        print(f"frontends: 1 shard on CPU 0, clients on CPU 1; {seconds} s each; model {MODEL} of {workload}")
        # The shard's own cost with no load (its reactor's turns): subtracted below.
        hz = os.sysconf("SC_CLK_TCK")
        before = cpu_ticks(serve.pid)
        time.sleep(3)
        idle_per_s = (cpu_ticks(serve.pid) - before) / hz / 3
        print(f"service CPU with no load: {idle_per_s * 100:.1f} % of a core")
        rows = []
        before = cpu_ticks(serve.pid)
        start = time.time()
        done, ok = run_http(http_addr, seconds, connections)
        rows.append(("HTTP/1.1 JSON", f"{connections} keep-alive connections (asyncio), closed loop", done, ok, time.time() - start, cpu_ticks(serve.pid) - before))
        http_rate = done / rows[-1][4]
        before = cpu_ticks(serve.pid)
        start = time.time()
        done, ok = run_grpc(grpc_addr, seconds)
        rows.append(("gRPC stream", f"tritonclient, {GRPC_WINDOW} in flight", done, ok, time.time() - start, cpu_ticks(serve.pid) - before))
        # The native client on the same model at the HTTP run's rate (a workload of that one
        # model: the others would spread the load into batches of one).
        line = next(l for l in open(workload) if f"model: {MODEL}," in l)
        line = re.sub(r"rps: \d+", f"rps: {http_rate:.0f}", line).replace("bench: [{duration: 4,", f"bench: [{{duration: {seconds},")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(f"seed: 42\ngpus: 1024\nmodels:\n{line}")
        scale = 1.0
        report = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
        before = cpu_ticks(serve.pid)
        start = time.time()
        subprocess.run([binary, "loadgen", "--target", native, "--workload", f.name, "--rate-scale", f"{scale:.6f}",
                        "--connections", "2", "--json", report], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        summary = json.load(open(report))
        rows.append(("native", f"symphony loadgen, open loop at {http_rate:,.0f} req/s", summary["requests"],
                     summary["requests"] - summary.get("noreply", 0), time.time() - start, cpu_ticks(serve.pid) - before))
        print("| front end | client | requests | answered | req/s | service CPU us/request | above no load |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for name, client, done, ok, wall, ticks in rows:
            cpu = ticks / hz
            above = max(cpu - idle_per_s * wall, 0.0)
            print(
                f"| {name} | {client} | {done:,} | {ok:,} | {done / wall:,.0f} | {cpu * 1e6 / max(done, 1):.1f} "
                f"| {above * 1e6 / max(done, 1):.1f} |"
            )
    finally:
        serve.terminate()
        serve.wait()


if __name__ == "__main__":
    main()
