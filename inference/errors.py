"""The one exception tree of the endpoint.

    JV3Error                      base; ``status`` is the HTTP status it maps to
    ├── InvalidRequest            400  the caller's fault: the message names the bad value
    │   ├── PayloadTooLarge       413
    │   ├── UnsupportedMediaType  415
    │   └── NotAcceptable         406
    ├── CheckpointError           500  a model directory that cannot be served (raised at load)
    ├── SettingsError             500  a JV3_* setting the deployment got wrong (raised at start-up, never per request)
    ├── ModelError                500  ours: a bug or a broken device
    ├── CapacityError             507/503  out of memory even after splitting the batch
    └── RequestTimeout            503  not answered within JV3_REQUEST_TIMEOUT_S (local/BYOC server)
"""

from __future__ import annotations


class JV3Error(Exception):
    status: int = 500
    kind: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        body = {"type": self.kind, "message": self.message, "code": self.status}
        if self.field:
            body["field"] = self.field
        return {"error": body}


class InvalidRequest(JV3Error):
    status = 400
    kind = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    status = 413
    kind = "payload_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    kind = "unsupported_media_type"


class NotAcceptable(InvalidRequest):
    status = 406
    kind = "not_acceptable"


class CheckpointError(JV3Error):
    status = 500
    kind = "checkpoint_error"


class SettingsError(JV3Error):
    """The operator's mistake, found when the endpoint starts (or the archive is built): never a 4xx."""

    status = 500
    kind = "settings_error"


class ModelError(JV3Error):
    status = 500
    kind = "model_error"


class CapacityError(JV3Error):
    status = 507
    kind = "capacity_error"


class RequestTimeout(JV3Error):
    status = 503
    kind = "timeout"
