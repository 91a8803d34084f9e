"""The TetherError hierarchy and the one renderer for Cinder's fault format."""

from __future__ import annotations

from typing import Any

FAULT_NAMES = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    406: "notAcceptable",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
    422: "unprocessableEntity",
    503: "serviceUnavailable",
}


def fault_body(code: int, message: str) -> dict[str, Any]:
    return {FAULT_NAMES.get(code, "computeFault"): {"code": code, "message": message}}


class TetherError(Exception):
    code = 500
    message = "The server has either erred or is incapable of performing the requested operation."
    # response headers the fault carries (a 401's WWW-Authenticate)
    headers: dict[str, str] | None = None

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        if message:
            self.message = message

    def body(self) -> dict[str, Any]:
        return fault_body(self.code, self.message)


class BadRequest(TetherError):
    code = 400
    message = "Bad request."


class InvalidInput(BadRequest):
    pass


class InvalidVolume(BadRequest):
    pass


class InvalidAttachment(BadRequest):
    pass


class Unauthorized(TetherError):
    code = 401
    message = "Authentication required."

    def __init__(self, message: str | None = None, *, www_authenticate: str | None = None) -> None:
        super().__init__(message)
        if www_authenticate is not None:
            # keystone mode: where clients get a token (keystonemiddleware's header)
            self.headers = {"WWW-Authenticate": f'Keystone uri="{www_authenticate}"'}


class Forbidden(TetherError):
    code = 403
    message = "Policy doesn't allow this operation to be performed."


class NotFound(TetherError):
    code = 404
    message = "The resource could not be found."


class VolumeNotFound(NotFound):
    def __init__(self, volume_id: object) -> None:
        super().__init__(f"Volume {volume_id} could not be found.")


class AttachmentNotFound(NotFound):
    def __init__(self, attachment_id: object) -> None:
        super().__init__(f"Volume attachment {attachment_id} could not be found.")


class VolumeTypeNotFound(NotFound):
    def __init__(self, type_id: object) -> None:
        super().__init__(f"Volume type {type_id} could not be found.")


class MethodNotAllowed(TetherError):
    code = 405
    message = "The method is not allowed for this resource."


class NotAcceptable(TetherError):
    code = 406


class Conflict(TetherError):
    code = 409
    message = "Conflict."


class UnprocessableEntity(TetherError):
    """A request the server understood but will not run: an Idempotency-Key reused for another request."""

    code = 422
    message = "The request cannot be processed."


class InUseByServer(Conflict):
    """OSSA-2023-003 (Cinder bug 2004555): an attachment a server uses is detached through Nova, which sends a
    service token; a user deleting it could leave the host's device pointing at another volume later."""

    def __init__(self, instance_id: object) -> None:
        super().__init__(f"Detach volume from instance {instance_id} using the Compute API")


class OverLimit(TetherError):
    code = 413
    message = "Request body is too large."


class BackendFailure(TetherError):
    """The storage host failed; the message says what was attempted, never the command output."""

    code = 500


class ServiceUnavailable(TetherError):
    """Something the request needs is down or was lost mid-way (a lock's connection); nothing half-done stays."""

    code = 503


class DatabaseUnavailable(ServiceUnavailable):
    """The database went away (a restart, a dropped connection) while serving the request; try again."""

    message = "The database is unavailable; try again later."
