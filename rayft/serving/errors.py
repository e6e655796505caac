"""Serving errors. Each carries the HTTP status and OpenAI error fields it is answered with."""

from __future__ import annotations

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
    """An adapter that is unsafe or incompatible with the base model: nothing was loaded."""

    status = 400


class EngineFailed(ServeError):
    """The engine failed while answering or starting (a bug or a resource limit): the server's
    fault, not the request's; only the requests it names are affected."""

    status = 500
    type = "server_error"
