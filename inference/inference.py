"""SageMaker's handler contract (``model_fn``/``input_fn``/``predict_fn``/``output_fn``) over protocol + engine.

These functions only adapt: ``protocol`` parses and writes, the engine embeds. In the archive,
``code/inference.py`` re-exports them from the copied package (see ``model_package``).

Errors. The PyTorch DLC's toolkit (sagemaker-inference-toolkit's ``Transformer``) answers 500 for
any exception except ``BaseInferenceToolkitError(status_code, message, phrase)``, whose status it
honours, but it writes ``message + "\\n" + traceback`` as the body. So a ``JV3Error`` is answered in
one of two ways:

- the toolkit hands us its request ``context`` (it does when a function accepts one): we set the
  status on it with ``context.set_response_status`` (the very call the toolkit's own error path
  makes) and return the JSON error body as a normal response, so the caller gets exactly
  docs/wire-format.md's body;
- no such context (other servers, tests): we raise ``BaseInferenceToolkitError`` with our status and
  JSON body when ``sagemaker_inference`` is importable, else the ``JV3Error`` itself.

Work caps. ``input_fn`` bounds each request as the local/BYOC server does (docs/wire-format.md,
"Limits"), before ``predict_fn`` computes anything: the body (``JV3_MAX_REQUEST_BYTES``; a body over
TorchServe's own ``max_request_size`` never reaches us: TorchServe answers it 413 with an empty body),
its texts or records (``protocol.Limits``) and its estimated response. The toolkit hands the Accept header to ``output_fn``
only, so ``input_fn`` reads it where the toolkit does (``_toolkit_accept``): an Accept this endpoint
cannot answer is a 406 before compute too.
"""

from __future__ import annotations

import logging
import os
from http import HTTPStatus

from .errors import JV3Error, ModelError
from .protocol import (
    JSON,
    Invocation,
    Limits,
    check_request_size,
    check_response_size,
    error_body,
    negotiate,
    parse_request,
    write_response,
)
from .settings import TASKS, Settings
from .torchserve import stop_model_server, worker_gpu

log = logging.getLogger("jv3.handler")

_loaded = {}  # the engine model_fn loaded: input_fn validates task and dimensions against it


class _Failed:
    """A request that already failed; carried to ``output_fn``, which answers it."""

    def __init__(self, error: JV3Error):
        self.error = error


def model_fn(model_dir: str, context=None):
    """Load the engine onto this worker's device; under TorchServe a failure stops the server (torchserve.py)."""
    try:
        from .engine import Engine, serving_devices

        settings = Settings.resolve()
        device = serving_devices(settings.device, gpu_id=worker_gpu(context))[0]
        engine = Engine.load(model_dir, settings=settings, device=device)
    except BaseException as exc:
        stop_model_server(exc)
        raise
    _loaded["engine"] = engine
    log.info("loaded %s from %s on %s: hidden %d, tasks %s", engine.model_name, model_dir, device, engine.hidden_size, engine.tasks)
    return engine


def input_fn(body, content_type: str, context=None):
    """Parse one request, refusing (4xx) before any compute what the local/BYOC server refuses."""
    engine = _loaded.get("engine")
    settings = _settings()
    limits = Limits.of(settings)
    try:
        size = _body_bytes(body)
        check_request_size(size, settings.max_request_bytes)
        invocation = parse_request(
            body,
            content_type,
            hidden_size=engine.hidden_size if engine is not None else 1 << 30,  # the engine checks again
            tasks=engine.tasks if engine is not None else TASKS,
            limits=limits,
        )
        media = negotiate(_toolkit_accept(context), invocation)  # output_fn negotiates the same Accept again
        if engine is not None:  # no engine, no hidden size to estimate with (tests that skip model_fn)
            check_response_size(
                invocation, media, limits, hidden_size=engine.hidden_size, echoed_bytes=size,
                default_dimensions=settings.default_dimensions, default_encoding=settings.default_encoding,
            )  # fmt: skip
        return invocation
    except JV3Error as err:
        return _fail(err, context)


def _body_bytes(body) -> int:
    """The body's size in bytes: the toolkit hands JSON and CSV bodies over decoded to ``str``."""
    if isinstance(body, str):
        return len(body) if body.isascii() else len(body.encode("utf-8"))  # isascii() is O(1) in CPython
    return len(body)


def _toolkit_accept(context) -> str | None:
    """The Accept the toolkit will pass ``output_fn`` for this request, or None outside TorchServe.

    Read as sagemaker-inference's ``Transformer.transform`` reads it: from the first request's properties
    on TorchServe's context (the one context object, updated for each request), a missing Accept or
    ``*/*`` replaced by ``SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT`` (default ``application/json``)."""
    try:
        properties = context.request_processor[0].get_request_properties()
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    accept = properties.get("Accept") or properties.get("accept")
    if not accept or accept == "*/*":
        accept = os.environ.get("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", JSON)
    return accept


def predict_fn(data, model, context=None):
    if isinstance(data, _Failed):
        return data
    try:
        return data.complete(model.embed_many(data.pending()))
    except JV3Error as err:
        return _fail(err, context)
    except Exception as exc:  # a bug below us: answer a JSON 500, keep the traceback in the log
        log.exception("embed_many failed")
        return _fail(ModelError(f"the model failed: {type(exc).__name__}: {exc}"), context)


def output_fn(prediction, accept: str, context=None):
    if not isinstance(prediction, _Failed):
        try:
            media = negotiate(accept, prediction)
            return write_response(prediction, media, model=_model_name(), default_task=_settings().default_task)
        except JV3Error as err:
            prediction = _fail(err, context)
    error = prediction.error
    _set_status(context, error)
    return error_body(error), JSON


def _fail(error: JV3Error, context) -> _Failed:
    if _can_set_status(context):
        return _Failed(error)
    try:
        from sagemaker_inference.errors import BaseInferenceToolkitError
    except ImportError:
        raise error from None
    raise BaseInferenceToolkitError(error.status, error_body(error).decode("utf-8"), _phrase(error.status)) from error


def _can_set_status(context) -> bool:
    return context is not None and callable(getattr(context, "set_response_status", None))


def _set_status(context, error: JV3Error) -> None:
    if _can_set_status(context):
        context.set_response_status(code=error.status, phrase=_phrase(error.status))
    else:  # reached only when _fail could not carry the error: raise it the toolkit's way
        _fail(error, None)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _settings() -> Settings:
    engine = _loaded.get("engine")
    return engine.settings if engine is not None else Settings.resolve()


def _model_name() -> str:
    engine = _loaded.get("engine")
    return getattr(engine, "model_name", "jina-embeddings-v3")


__all__ = ["model_fn", "input_fn", "predict_fn", "output_fn", "Invocation"]
