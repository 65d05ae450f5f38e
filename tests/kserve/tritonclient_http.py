"""The real tritonclient (HTTP) against a running `symphony serve`.

Usage: python tritonclient_http.py HOST:PORT
Prints one line per check and exits non-zero on the first failure.
"""

import sys
import urllib.request

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from checks import check


def main():
    url = sys.argv[1]
    client = httpclient.InferenceServerClient(url=url)

    check("server live", client.is_server_live())
    check("server ready", client.is_server_ready())
    metadata = client.get_server_metadata()
    check("server metadata", metadata["name"] == "symphony", metadata)
    check("binary extension listed", "binary_tensor_data" in metadata["extensions"], metadata)

    check("model ready", client.is_model_ready("steady"))
    model = client.get_model_metadata("steady")
    declared = model["inputs"][0]
    check(
        "model metadata",
        declared == {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]},
        model,
    )
    config = client.get_model_config("steady")
    check("model config", config["max_batch_size"] > 1 and config["input"][0]["dims"] == [16], config)

    data = np.arange(16, dtype=np.float32).reshape(1, 16)
    # The client's default: binary tensors both ways.
    for binary in (True, False):
        tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
        result = client.infer("steady", [tensor], outputs=outputs, request_id=f"r-{binary}")
        output = result.as_numpy("OUTPUT0")
        response = result.get_response()
        check(
            f"infer ({'binary' if binary else 'JSON'} tensors)",
            output is not None
            and output.shape == (1, 4)
            and output.dtype == np.float32
            and response["model_name"] == "steady"
            and response["id"] == f"r-{binary}",
            (response, output),
        )

    # A timeout (the schedule policy's, in microseconds) no batch can meet: answered at once.
    tensor = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(data)
    try:
        client.infer("steady", [tensor], timeout=10)
        check("an unmeetable timeout is refused", False, "it was served")
    except InferenceServerException as error:
        check("an unmeetable timeout is refused", "dropped" in str(error), str(error))

    try:
        client.infer("no_such_model", [tensor])
        check("an unknown model is an error", False, "it was served")
    except InferenceServerException as error:
        check("an unknown model is an error", "unknown model" in str(error), str(error))
    check("an unknown model is not ready", not client.is_model_ready("no_such_model"))

    # The scrape counts what was sent: two inferences ran, one was dropped, one model was
    # unknown (answered by the front end).
    with urllib.request.urlopen(f"http://{url}/metrics") as response:
        samples = {}
        for line in response.read().decode().splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
    ran = sum(samples[f'symphony_requests_total{{model="steady",outcome="{o}"}}'] for o in ("success", "late"))
    check("metrics: requests that ran", ran == 2, ran)
    dropped = samples['symphony_requests_total{model="steady",outcome="dropped"}']
    check("metrics: requests dropped", dropped == 1, dropped)
    check("metrics: batches", samples['symphony_batch_size_sum{model="steady"}'] == 2, samples)
    stats = client.get_inference_statistics("steady")["model_stats"][0]
    check("statistics", stats["inference_count"] == 2 and stats["inference_stats"]["fail"]["count"] == 1, stats)


if __name__ == "__main__":
    main()
