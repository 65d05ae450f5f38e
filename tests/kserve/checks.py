"""What every KServe client script here reports with: one line per check, and on the first
failure an exit at once (`os._exit`: a gRPC stream's thread would keep the interpreter alive)."""

import os


def check(name, condition, detail=""):
    if not condition:
        print(f"FAIL {name}: {detail}", flush=True)
        os._exit(1)
    print(f"ok {name}", flush=True)
