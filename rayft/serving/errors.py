"""Serving errors. Each carries the HTTP status and OpenAI error fields it is answered with."""

from __future__ import annotations

import contextlib

from rayft.adapters import AdapterError
from rayft.errors import RayftError


class ServeError(RayftError):
    """A request or an adapter that cannot be served; becomes an OpenAI-style error body."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):  # keep param and code when Ray ships the error between processes
        return (type(self), (self.message, self.param, self.code))

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(ServeError):
    status = 400


class Unauthorized(ServeError):
    status = 401
    type = "authentication_error"


class NotFound(ServeError):
    status = 404


class Overloaded(ServeError):
    status = 503
    type = "server_error"


class AdapterRefused(ServeError):
    """An adapter that is unsafe or incompatible with the base model: nothing was loaded.
    rayft.adapters' checks raise AdapterError (merge and eval use them too); `of` answers one."""

    status = 400

    @classmethod
    def of(cls, e: AdapterError) -> AdapterRefused:
        return cls(e.message, e.param)


class EngineFailed(ServeError):
    """The engine failed while answering or starting (a bug or a resource limit): the server's
    fault, not the request's; only the requests it names are affected."""

    status = 500
    type = "server_error"


def serve_error(e: BaseException) -> ServeError | None:
    """The ServeError that an exception from an engine deployment or Ray task stands for: a
    full queue is a 503, a ServeError or AdapterError raised over there (an adapter that cannot
    be loaded) is itself rather than Ray's RayTaskError around it; None for anything else (a
    server fault)."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    if isinstance(e, RayTaskError):
        e = e.cause
    if isinstance(e, ServeError):
        return e
    if isinstance(e, AdapterError):
        return AdapterRefused.of(e)
    if isinstance(e, BackPressureError):
        return Overloaded("The server is at capacity; retry later", code="overloaded")
    return None


@contextlib.contextmanager
def engine_errors():
    """Around a call to an engine deployment or a Ray task: raise `serve_error(e)` instead of e
    where there is one."""
    try:
        yield
    except Exception as e:
        err = serve_error(e)
        if err is None or err is e:
            raise
        raise err from None
