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
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from .errors import JV3Error, ModelError
from .protocol import JSON, Invocation, error_body, negotiate, parse_request, write_response
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
    engine = _loaded.get("engine")
    try:
        return parse_request(
            body,
            content_type,
            hidden_size=engine.hidden_size if engine is not None else 1 << 30,  # the engine checks again
            tasks=engine.tasks if engine is not None else TASKS,
        )
    except JV3Error as err:
        return _fail(err, context)


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
