"""One replica of the Nuclio tracker in its own process, for tests/cvat/test_cvat_replicas.py.

Configured by the environment as a deployed function is (``NAPARI_STM_*``,
``CVAT_FUNCTIONS_REDIS_*``); runs nuclio-sdk's test Platform, which calls ``init_context`` and then
``handler`` as Nuclio does. Reads one request body per line on stdin (JSON) and writes
``{"status": ..., "body": ...}`` per line on stdout; prints ``{"ready": pid}`` once the model is
loaded.
"""

import json
import os
import sys

# The replies own stdout; whatever else prints (nuclio's logger, libraries) goes to stderr.
REPLIES = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

from nuclio_sdk import Event  # noqa: E402
from nuclio_sdk.test import Platform  # noqa: E402

from cvat_function.nuclio import main  # noqa: E402


def serve() -> None:
    platform = Platform()
    # The first call runs init_context (loads the model); answer it before saying ready.
    platform.call_handler(main.handler, Event(body=b"{}", content_type="application/json"))
    print(json.dumps({"ready": os.getpid()}), file=REPLIES, flush=True)
    for line in sys.stdin:
        event = Event(body=line.strip(), content_type="application/json", method="POST")
        response = platform.call_handler(main.handler, event)
        reply = {"status": response.status_code, "body": json.loads(response.body)}
        print(json.dumps(reply), file=REPLIES, flush=True)


if __name__ == "__main__":
    serve()
