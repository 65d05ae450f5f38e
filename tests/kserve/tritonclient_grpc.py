"""The real tritonclient (gRPC) against a running `symphony serve`.

Usage: python tritonclient_grpc.py HOST:PORT
Prints one line per check and exits non-zero on the first failure.
"""

import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from checks import check


def main():
    client = grpcclient.InferenceServerClient(url=sys.argv[1])

    check("server live", client.is_server_live())
    check("server ready", client.is_server_ready())
    metadata = client.get_server_metadata()
    check("server metadata", metadata.name == "symphony", metadata)
    check("model ready", client.is_model_ready("steady"))
    model = client.get_model_metadata("steady")
    check(
        "model metadata",
        model.inputs[0].name == "INPUT0" and model.inputs[0].datatype == "FP32" and list(model.inputs[0].shape) == [-1, 16],
        model,
    )

    data = np.arange(16, dtype=np.float32).reshape(1, 16)
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("steady", [tensor], request_id="unary-1")
    output = result.as_numpy("OUTPUT0")
    check(
        "infer (raw_input_contents)",
        output is not None and output.shape == (1, 4) and output.dtype == np.float32
        and result.get_response().id == "unary-1",
        result.get_response(),
    )

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

    config = client.get_model_config("steady", as_json=True)["config"]
    check(
        "model config",
        config["max_batch_size"] > 0 and config["input"][0]["data_type"] == "TYPE_FP32"
        and config["input"][0]["dims"] == ["16"] and config["output"][0]["dims"] == ["4"],
        config,
    )

    try:
        client.get_model_repository_index()
        check("a method not served is UNIMPLEMENTED", False, "it answered")
    except InferenceServerException as error:
        check("a method not served is UNIMPLEMENTED", "UNIMPLEMENTED" in str(error.status()), str(error))

    # A stream: many requests on one call, each answered on it (in any order).
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(8):
        client.async_stream_infer("steady", [tensor], request_id=f"s-{i}")
    client.async_stream_infer("steady", [tensor], request_id="s-late", timeout=10)
    got, errors = set(), []
    for _ in range(9):
        result, error = answers.get(timeout=10)
        if error is not None:
            errors.append(str(error))
        else:
            got.add(result.get_response().id)
            output = result.as_numpy("OUTPUT0")
            check("stream output", output is not None and output.shape == (1, 4), result.get_response())
    client.stop_stream()
    check("stream answers every request", got == {f"s-{i}" for i in range(8)}, got)
    check("stream tells a dropped request", len(errors) == 1 and "dropped" in errors[0], errors)

    # What ran: the unary request and the stream's 8; what did not: the 2 unmeetable timeouts.
    stats = client.get_inference_statistics("steady", as_json=True)["model_stats"][0]
    check(
        "model statistics count what was sent",
        stats["inference_count"] == "9" and stats["inference_stats"]["fail"]["count"] == "2"
        and int(stats["execution_count"]) >= 1 and stats["batch_stats"],
        stats,
    )


if __name__ == "__main__":
    main()
