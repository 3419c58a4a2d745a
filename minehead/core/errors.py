"""Errors that know their gRPC status code.

Library code raises these; one server interceptor (minehead.core.server) turns them into
`context.abort(code, message)`, so servicers stay thin and libraries stay free of gRPC calls.
"""

from __future__ import annotations

import grpc


class MineheadError(Exception):
    """Base class: `code` is the gRPC status a client sees, the message is shown as is."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(MineheadError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MineheadError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MineheadError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MineheadError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MineheadError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(MineheadError, PermissionError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(MineheadError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(MineheadError):
    """Raised inside a job when its cancel was requested; the runner records CANCELLED."""

    code = grpc.StatusCode.CANCELLED


class Interrupted(MineheadError):
    """Raised inside a job when its server is stopping: the runner records INTERRUPTED, as a
    restart would have, but at a safe point of the job's own choosing."""

    code = grpc.StatusCode.ABORTED


class ModelUnavailable(FailedPrecondition):
    """A known model whose weights cannot be found; the message says how to provide them."""
