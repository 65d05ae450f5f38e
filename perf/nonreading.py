#!/usr/bin/env python3
"""Clients that write requests and never read their replies, against a running `symphony
serve`, while one well-behaved client measures how soon it is answered; or connection churn
(many idle connections opened and closed). Prints what the serve process's resident memory
did (from /proc). Written from docs/protocol.md alone (no Rust).

Usage: nonreading.py ADDR PID writers CLIENTS SECONDS [MODEL]
       nonreading.py ADDR PID churn CYCLES CONNECTIONS
"""
import socket
import struct
import sys
import threading
import time

MAGIC = 0x504D5953
VERSION = 2


def request(request_id, model):
    """A REQUEST frame by model name (docs/protocol.md, "Request"), with an empty input."""
    name = model.encode()
    out = bytearray()
    if len(name) > 8:
        out += name
    input_pos = len(out)
    root = len(out)
    out += struct.pack("<Q", request_id)
    out += b"\x01"
    if len(name) <= 8:
        out += name + b"\xff" * (8 - len(name))
    else:
        length = 0x80 | (len(name) & 0x3F) | ((len(name) >> 6) << 8)
        out += struct.pack("<Ii", length, 0 - (root + 9))
    out += b"\x00" * 5
    out += struct.pack("<iI", input_pos - (root + 22), 0)
    return struct.pack("<IHHII", MAGIC, VERSION, 1, len(out), 0) + bytes(out)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def probe(addr, model):
    """One request on a fresh connection: seconds until its reply, or None."""
    started = time.monotonic()
    try:
        with socket.create_connection(addr, timeout=2) as s:
            s.sendall(request(1, model))
            header = b""
            while len(header) < 16:
                chunk = s.recv(16 - len(header))
                if not chunk:
                    return None
                header += chunk
            return time.monotonic() - started
    except OSError:
        return None


def writers(addr, pid, clients, seconds, model):
    burst = b"".join(request(i, model) for i in range(20000))
    stop = time.monotonic() + seconds
    def write():
        s = socket.create_connection(addr)
        s.settimeout(0.2)
        while time.monotonic() < stop:
            try:
                s.sendall(burst)
            except (socket.timeout, BlockingIOError):
                pass
            except OSError:
                break
        return s
    base = rss_kib(pid)
    threads = [threading.Thread(target=write) for _ in range(clients)]
    for t in threads:
        t.start()
    peak, worst = base, 0.0
    unanswered = 0
    while time.monotonic() < stop:
        time.sleep(0.5)
        peak = max(peak, rss_kib(pid))
        took = probe(addr, model)
        if took is None:
            unanswered += 1
        else:
            worst = max(worst, took)
    for t in threads:
        t.join()
    print(f"{clients} clients writing {model!r} requests and never reading, {seconds} s: "
          f"resident {base // 1024} MiB at start, peak {peak // 1024} MiB; "
          f"a reading client answered within {worst * 1000:.1f} ms at worst, {unanswered} probes unanswered")


def churn(addr, pid, cycles, connections):
    base = rss_kib(pid)
    peak = base
    for _ in range(cycles):
        held = []
        for _ in range(connections):
            try:
                held.append(socket.create_connection(addr))
            except OSError:
                break
        time.sleep(0.3)
        peak = max(peak, rss_kib(pid))
        for s in held:
            s.close()
        time.sleep(0.3)
    time.sleep(1.0)
    print(f"{cycles} cycles of {connections} idle connections opened and closed: resident "
          f"{base // 1024} MiB at start, peak {peak // 1024} MiB, {rss_kib(pid) // 1024} MiB after")


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    addr = (host, int(port))
    pid = int(sys.argv[2])
    if sys.argv[3] == "writers":
        model = sys.argv[6] if len(sys.argv) > 6 else "no-such-model"
        writers(addr, pid, int(sys.argv[4]), float(sys.argv[5]), model)
    else:
        churn(addr, pid, int(sys.argv[4]), int(sys.argv[5]))


if __name__ == "__main__":
    main()
