"""The receiver's exceptions: what an engine catches around `Receiver.receive`."""


class ProtocolError(RuntimeError):
    """The daemon said something this receiver does not understand."""


class ReceiveError(RuntimeError):
    """Applying an update failed here; the daemon was told and the update was dropped."""

    def __init__(self, message: str, update: str | None = None, bucket: int | None = None) -> None:
        super().__init__(message)
        self.update = update
        self.bucket = bucket


class UpdateAborted(RuntimeError):
    """The daemon aborted the update (it failed elsewhere); the engine may hold part of it."""

    def __init__(self, update: str, reason: str) -> None:
        super().__init__(f"update {update} aborted: {reason}")
        self.update = update
        self.reason = reason
