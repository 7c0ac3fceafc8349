"""The one exception type of the package, built from the library's status and message."""
from . import _lib


class QattnError(RuntimeError):
    """A failed qattn call. `.status` is the status name ("QATTN_ERROR_OUT_OF_RANGE"),
    `.message` says what was wrong."""

    def __init__(self, status, message):
        super().__init__("%s: %s" % (status, message))
        self.status = status
        self.message = message


def check(code):
    """Raises QattnError for a non-zero status, with the calling thread's last message."""
    if code != 0:
        name = _lib.lib.qattn_status_string(code).decode()
        message = _lib.lib.qattn_last_error().decode(errors="replace")
        raise QattnError(name, message)


def invalid(message):
    return QattnError("QATTN_ERROR_INVALID_ARGUMENT", message)
