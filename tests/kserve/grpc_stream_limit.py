"""`limits.grpc_streams_per_connection` reached: against a `symphony serve` whose limit is 2,
three ModelStreamInfer calls on one gRPC channel (one HTTP/2 connection). The first two are
answered; the third waits (the client holds it back: the server's MAX_CONCURRENT_STREAMS)
until one of the two ends, then it is answered too.

Usage: python grpc_stream_limit.py HOST:PORT
Prints one line per check and exits non-zero on the first failure.
"""

import os
import queue
import sys
import threading

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from checks import check


def requests(feed):
    while True:
        item = feed.get()
        if item is None:
            return
        yield item


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = service_pb2.ModelInferRequest(model_name="steady")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.arange(16, dtype=np.float32).tobytes())

    feeds = [queue.Queue() for _ in range(3)]
    calls = [stub.ModelStreamInfer(requests(feed)) for feed in feeds]
    answers = queue.Queue()

    def first_answer(index):
        try:
            answer = next(calls[index])
            answers.put((index, answer.error_message))
        except Exception as error:  # the call failed: reported as the check's detail
            answers.put((index, f"call failed: {error}"))

    for feed in feeds:
        feed.put(request)
    for index in range(3):
        threading.Thread(target=first_answer, args=(index,), daemon=True).start()
    # Which two get the connection's streams is the client's choice.
    got = [answers.get(timeout=20), answers.get(timeout=20)]
    check("two streams answered", len({i for i, _ in got}) == 2 and all(e == "" for _, e in got), got)
    first = got[0][0]
    waiting = ({0, 1, 2} - {i for i, _ in got}).pop()
    try:
        early = answers.get(timeout=1.5)
        check("the third stream waits for room", False, f"answered at once: {early}")
    except queue.Empty:
        check("the third stream waits for room", True)
    # One of the two ends: the third gets its turn.
    feeds[first].put(None)
    for _ in calls[first]:
        pass
    index, error = answers.get(timeout=20)
    check("the third stream is answered once one ends", index == waiting and error == "", (index, error))
    for index in range(3):
        if index != first:
            feeds[index].put(None)
            for _ in calls[index]:
                pass
    check("every call ends", True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
