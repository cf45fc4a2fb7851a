"""Nuclio entry points of the napari-stm tracker (handler ``cvat_function.nuclio.main:handler``)."""

import json

from cvat_function.nuclio.model_handler import ModelHandler
from cvat_function.payload import reason


def init_context(context) -> None:  # noqa: ANN001 - nuclio's Context
    context.logger.info("napari-stm tracker: loading the model")
    context.user_data.model_handler = ModelHandler.from_env(logger=context.logger)
    context.logger.info("napari-stm tracker: ready")


def handler(context, event):  # noqa: ANN001 - nuclio's Context and Event
    status, body = context.user_data.model_handler.handle(event.body)
    # Nuclio writes no reason phrase of ours and CVAT drops the body: the message also goes
    # into a header, for REST clients and proxies' logs.
    headers = {"X-Napari-Stm-Error": reason(body["error"])} if "error" in body else {}
    return context.Response(
        body=json.dumps(body),
        headers=headers,
        content_type="application/json",
        status_code=status,
    )
