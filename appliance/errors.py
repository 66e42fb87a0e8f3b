"""One small hierarchy of user-facing errors.

Every error the appliance raises on purpose carries a short title (what went wrong) and a hint
(what to do about it). The CLI prints both, the TUI shows them in a modal, and a job writes them
as an `error` event, so a user never has to read a traceback.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """An error with a user-facing title and a hint that says how to fix it."""

    title = "Something went wrong"

    def __init__(self, message: str, hint: str = "", *, title: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if title is not None:
            self.title = title

    def __str__(self) -> str:
        return f"{self.message}\nhint: {self.hint}" if self.hint else self.message


class ConfigError(ApplianceError):
    title = "Invalid configuration"


class StoreError(ApplianceError):
    title = "Model store problem"


class UnsafeWeightsError(StoreError):
    title = "Refused unsafe weights"


class ToolchainError(ApplianceError):
    title = "llama.cpp toolchain problem"


class EgressBlocked(ApplianceError):
    title = "Network access blocked"


class JobFailed(ApplianceError):
    title = "Job failed"


class Cancelled(ApplianceError):
    title = "Cancelled"


class JobBusy(ApplianceError):
    title = "Run is busy"


class DiskFull(ApplianceError):
    title = "Disk full"


_DISK_FULL_ERRNOS = (28, 27, 122)  # ENOSPC, EFBIG (a file-size limit), EDQUOT
_DISK_FULL_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded", "FileTooLarge",
                    "StorageFull", "os error 27", "os error 28")


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc`, or an error it was raised from, is a write refused for lack of space or a file-size
    limit (libraries such as safetensors report those as their own exception types, with the OS text)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(current) for text in _DISK_FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False
