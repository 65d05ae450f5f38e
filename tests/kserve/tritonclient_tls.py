"""The real tritonclient over TLS against a `symphony serve` with `[tls]`.

Usage: python tritonclient_tls.py HTTP_ADDR GRPC_ADDR METRICS_ADDR CA_PEM
Prints one line per check and exits non-zero on the first failure.
"""

import os
import queue
import ssl
import sys
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from checks import check


def main():
    http_addr, grpc_addr, metrics_addr, ca = sys.argv[1:5]
    data = np.arange(16, dtype=np.float32).reshape(1, 16)

    http = httpclient.InferenceServerClient(url=http_addr, ssl=True, ssl_options={"ca_certs": ca})
    check("https: server live", http.is_server_live())
    model = http.get_model_metadata("steady")
    check("https: model metadata", model["inputs"][0]["shape"] == [-1, 16], model)
    for binary in (True, False):
        tensor = httpclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(data, binary_data=binary)
        result = http.infer("steady", [tensor])
        output = result.as_numpy("OUTPUT0")
        check(f"https: infer (binary {binary})", output is not None and output.shape == (1, 4), result.get_response())

    grpc = grpcclient.InferenceServerClient(url=grpc_addr, ssl=True, root_certificates=ca)
    check("grpcs: server live", grpc.is_server_live())
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(data)
    result = grpc.infer("steady", [tensor], request_id="tls-1")
    output = result.as_numpy("OUTPUT0")
    check("grpcs: infer", output is not None and output.shape == (1, 4) and result.get_response().id == "tls-1")
    answers = queue.Queue()
    grpc.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(3):
        grpc.async_stream_infer("steady", [tensor], request_id=f"stream-{i}")
    got = sorted(answers.get(timeout=30)[0].get_response().id for _ in range(3))
    grpc.stop_stream()
    check("grpcs: stream", got == ["stream-0", "stream-1", "stream-2"], got)

    context = ssl.create_default_context(cafile=ca)
    with urllib.request.urlopen(f"https://{metrics_addr}/metrics", context=context, timeout=10) as answer:
        text = answer.read().decode()
    # 2 + 1 + 3 inferences of `steady` answered, on this service's fresh counters.
    served = [line for line in text.splitlines() if line.startswith('symphony_requests_total{model="steady",outcome="success"}')]
    check("https: metrics count what was served", served and served[0].split()[-1] == "6", served)

    # Plain HTTP to the TLS port: a 400 that says why, not a hang or a reset.
    try:
        urllib.request.urlopen(f"http://{http_addr}/v2/health/live", timeout=10)
        check("plain http is refused", False, "it was served")
    except urllib.error.HTTPError as error:
        body = error.read().decode()
        check("plain http is refused", error.code == 400 and "TLS only" in body, body)

    # A client that does not trust the certificate does not get through.
    try:
        urllib.request.urlopen(f"https://{http_addr}/v2/health/live", context=ssl.create_default_context(), timeout=10)
        check("an untrusting client is stopped", False, "it was served")
    except urllib.error.URLError as error:
        check("an untrusting client is stopped", "CERTIFICATE_VERIFY_FAILED" in str(error), str(error))


if __name__ == "__main__":
    main()
    # grpc's threads can hold the interpreter at exit.
    sys.stdout.flush()
    os._exit(0)
