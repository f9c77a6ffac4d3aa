"""TorchServe handler service for the PyTorch DLC: the toolkit's own, with two faults mended.

The CDK stacks select it with ``TS_DEFAULT_SERVICE_HANDLER=jv3_inference.sagemaker_service``
(TorchServe reads ``TS_*`` variables over its config file: the image sets ``enable_envvars_config``).
Without that variable the archive still serves through the toolkit's stock service; only these two
mends are then missing:

- **Invalid UTF-8 is the caller's 400.** The toolkit decodes ``application/json`` and ``text/csv``
  bodies itself before ``input_fn`` and answers a ``UnicodeDecodeError`` with 500 and a traceback.
  Here such a body goes to ``input_fn`` as bytes, whose parser names the bad byte (docs/wire-format.md).
- **A failed start-up stops the server** even when it fails before ``model_fn`` (importing
  code/inference.py, say), which ``model_fn``'s own guard cannot see.

Importable only where the toolkit is (the DLC); TorchServe requires exactly one class in this module.
"""

from __future__ import annotations

from .torchserve import stop_model_server  # standard library only: safe before code/lib is on the path

try:  # TorchServe imports this module before the toolkit imports code/inference.py, the archive's entry
    # module, which puts code/lib (the vendored dependencies: orjson, transformers, ...) first on sys.path
    # and checks the Python version: import it first, and stop the server if it cannot load.
    import inference  # noqa: F401 - code/inference.py
except BaseException as exc:
    stop_model_server(exc)
    raise

from sagemaker_inference import content_types, utils  # noqa: E402
from sagemaker_pytorch_serving_container.handler_service import HandlerService  # noqa: E402

from .inference import input_fn, output_fn  # noqa: E402


class JV3HandlerService(HandlerService):
    def initialize(self, context):
        try:
            super().initialize(context)
        except BaseException as exc:
            stop_model_server(exc)
            raise

    def handle(self, data, context):
        # The toolkit answers one request per call (it reads request_processor[0]); so do we.
        if data and len(data) == 1:
            body = data[0].get("body")
            properties = context.request_processor[0].get_request_properties()
            content_type = utils.retrieve_content_type_header(properties)  # as the toolkit reads it
            if isinstance(body, (bytes, bytearray)) and content_type in content_types.UTF8_TYPES:
                try:
                    bytes(body).decode("utf-8")
                except UnicodeDecodeError:
                    accept = properties.get("Accept") or properties.get("accept")
                    return [self._refuse(bytes(body), content_type, accept, context)]
        return super().handle(data, context)

    @staticmethod
    def _refuse(body: bytes, content_type: str, accept: str | None, context) -> bytes:
        invocation = input_fn(body, content_type, context)  # the parser's 400; its status set on context
        payload, media = output_fn(invocation, accept or content_types.JSON, context)
        context.set_response_content_type(0, media)
        return payload

