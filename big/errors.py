"""Errors a client sees. Each carries a stable `code` so clients can branch without parsing text."""


class BIGError(Exception):
    code = "error"

    def __str__(self) -> str:
        return f"[{self.code}] {super().__str__()}"


class BadRequest(BIGError, ValueError):
    code = "bad_request"


class AuthError(BIGError, PermissionError):
    code = "unauthenticated"


class NotFound(BIGError, LookupError):
    """Also used for concepts that exist but belong to someone else: never leak existence."""

    code = "not_found"


class Conflict(BIGError):
    code = "conflict"


class JobCancelled(BIGError):
    code = "cancelled"


class QuotaExceeded(BIGError):
    """A per-user limit (queued generations, jobs, private concepts, stored bytes) would be passed."""

    code = "quota_exceeded"


class Unavailable(BIGError):
    """The registry (the database every replica shares) did not answer within a few seconds of retrying: the
    request changed nothing and may be sent again. Never carries the driver's text or the server's address."""

    code = "unavailable"


class OutOfMemory(BIGError, MemoryError):
    """Even one image does not fit in the accelerator's memory (larger batches are split, not refused)."""

    code = "out_of_memory"


# Every error a client may see (docs/api.md, "Errors"): anything else a server raises reaches a client as a BIGError.
ERRORS = (BIGError, BadRequest, AuthError, NotFound, Conflict, JobCancelled, OutOfMemory, QuotaExceeded, Unavailable)


def error_for(code: str | None, message: str) -> BIGError:
    """The error of a stored `code` (a job's `error_code`), so a job's failure reaches its client as it was
    raised; a code this version does not know is a plain BIGError."""
    return {cls.code: cls for cls in ERRORS}.get(code, BIGError)(message)
