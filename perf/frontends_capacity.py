"""The front ends' capacity side by side: one `symphony serve` (1 shard on CPU 0, the load
tools on CPU 1), one light model scheduled eagerly on 64 simulated GPUs (so the front end,
not the scheduler's deferral or GPU time, bounds the rate), each front end saturated in turn
by a load tool written in C: wrk for KServe HTTP/1.1 (JSON infer), h2load for gRPC
(ModelInfer with raw_input_contents, many streams per connection), and `symphony loadgen`
for the native protocol (open loop, at a rate above what the others reached); then HTTP and
gRPC again on a second service with `[tls]` (a certificate made with openssl; the native
load generator has no TLS).

Requests answered OK per second come from the service's own counter
(symphony_requests_total{outcome="success"}, scraped before and after each run), not from the
tools; the service's CPU per request from /proc.

Usage: python perf/frontends_capacity.py SYMPHONY_BINARY [SECONDS] [NATIVE_RPS]
Needs wrk and h2load (Debian: wrk, nghttp2-client) and tritonclient (for the gRPC message).
"""

import json
import os
import re
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

# The infer body and /proc reading of perf/frontends.py (same folder).
from frontends import BODY, cpu_ticks, started_addrs

CONFIG = """listen = "127.0.0.1:0"
shards = 1
cpus = [0]
gpus = 64
[[models]]
name = "f0"
profile = "sleep#1,20,0,0"
slo_ms = 1000
inputs = [{ name = "INPUT0", datatype = "UINT8", shape = [16] }]
outputs = [{ name = "OUTPUT0", datatype = "UINT8", shape = [4] }]
[policy]
kind = "eager"
"""


def served(scheme, http_addr):
    """The service's count of f0's requests answered OK (the certificate is the script's own:
    not checked)."""
    context = ssl._create_unverified_context() if scheme == "https" else None
    text = urllib.request.urlopen(f"{scheme}://{http_addr}/metrics", timeout=10, context=context).read().decode()
    for line in text.splitlines():
        if line.startswith('symphony_requests_total{model="f0",outcome="success"}'):
            return int(float(line.split()[-1]))
    return 0


def grpc_body(path):
    import numpy as np
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="f0")
    tensor = request.inputs.add(name="INPUT0", datatype="UINT8", shape=[1, 16])
    del tensor
    request.raw_input_contents.append(np.arange(16, dtype=np.uint8).tobytes())
    message = request.SerializeToString()
    with open(path, "wb") as f:
        f.write(struct.pack(">BI", 0, len(message)) + message)


def on_cpu1(command):
    return ["taskset", "-c", "1", *command]


def start(binary, scratch, name, tls):
    """`symphony serve` with CONFIG (and `[tls]` with a certificate made here): (process,
    native, HTTP and gRPC addresses)."""
    config = os.path.join(scratch, f"{name}.toml")
    text = CONFIG
    if tls:
        cert, key = os.path.join(scratch, "cert.pem"), os.path.join(scratch, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], capture_output=True, check=True)
        text = text.replace("[[models]]", f'[tls]\ncert = "{cert}"\nkey = "{key}"\n[[models]]', 1)
    with open(config, "w") as f:
        f.write(text)
    log = open(os.path.join(scratch, f"{name}.log"), "w+")
    serve = subprocess.Popen(
        [binary, "serve", "--config", config, "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0", "--metrics", "off"],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    native, http_addr, grpc_addr = started_addrs(log.name)
    return serve, native, http_addr, grpc_addr


def measure(serve, scheme, http_addr, name, client, command):
    """Runs a load tool: (name, client, answered OK, wall seconds, service CPU ticks, notes)."""
    ok_before, ticks_before, start = served(scheme, http_addr), cpu_ticks(serve.pid), time.time()
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    wall = time.time() - start
    ok, ticks = served(scheme, http_addr) - ok_before, cpu_ticks(serve.pid) - ticks_before
    notes = re.findall(r"(Non-2xx.*|.*succeeded, \d+ failed.*)", out)
    return (name, client, ok, wall, ticks, "; ".join(n.strip() for n in notes))


def main():
    binary = sys.argv[1]
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    native_rps = int(sys.argv[3]) if len(sys.argv) > 3 else 200_000
    scratch = tempfile.mkdtemp(prefix="symphony-capacity-")
    lua = os.path.join(scratch, "post.lua")
    with open(lua, "w") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(BODY)}\nwrk.headers["content-type"] = "application/json"\n')
    body = os.path.join(scratch, "infer.grpc")
    grpc_body(body)
    hz = os.sysconf("SC_CLK_TCK")
    print(f"frontends_capacity: 1 shard on CPU 0, load tools on CPU 1; {seconds} s each; model f0 "
          "(sleep#1,20: 21 us a batch of one), eager, 64 simulated GPUs, SLO 1 s")
    rows = []
    for tls in (False, True):
        serve, native, http_addr, grpc_addr = start(binary, scratch, "tls" if tls else "plain", tls)
        scheme, over = ("https", " over TLS") if tls else ("http", "")
        try:
            rows.append(measure(serve, scheme, http_addr, f"HTTP/1.1 JSON{over}", "wrk -t1 -c64 (keep-alive, a request at a time each)",
                                on_cpu1(["wrk", "-t1", "-c64", f"-d{seconds}s", "-s", lua,
                                         f"{scheme}://{http_addr}/v2/models/f0/infer"])))
            rows.append(measure(serve, scheme, http_addr, f"gRPC ModelInfer{over}", "h2load -t1 -c4 -m64 (256 streams at a time)",
                                on_cpu1(["h2load", "-t1", "-c4", "-m64", "-D", str(seconds), "-d", body,
                                         "-H", "content-type: application/grpc", "-H", "te: trailers",
                                         f"{scheme}://{grpc_addr}/inference.GRPCInferenceService/ModelInfer"])))
            if not tls:
                workload = os.path.join(scratch, "native.yaml")
                with open(workload, "w") as f:
                    f.write("seed: 42\ngpus: 64\nmodels:\n"
                            f'- {{framework: "sleep#1,20,0,0", model: f0, slo: 1000, gap: exp, warmup: [{{duration: 1, rps: {native_rps}}}], '
                            f"bench: [{{duration: {seconds}, rps: {native_rps}}}], cooldown: [{{duration: 1, rps: {native_rps}}}]}}\n")
                report = os.path.join(scratch, "native.json")
                row = measure(serve, scheme, http_addr, "native", f"symphony loadgen, open loop at {native_rps:,} req/s (2 connections)",
                              on_cpu1([binary, "loadgen", "--target", native, "--workload", workload, "--connections", "2",
                                       "--json", report]))
                summary = json.load(open(report))
                rows.append(row[:5] + (f"{summary['requests']:,} sent",))
        finally:
            serve.terminate()
            serve.wait()
    print("| front end | load | answered OK | req/s OK | service CPU us/request | notes |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for name, client, ok, wall, ticks, notes in rows:
        print(f"| {name} | {client} | {ok:,} | {ok / wall:,.0f} | {ticks / hz * 1e6 / max(ok, 1):.1f} | {notes} |")


if __name__ == "__main__":
    main()
