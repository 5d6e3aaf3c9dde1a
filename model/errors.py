"""Project errors: each carries a message fit to show a user as is."""

from __future__ import annotations


class ViTLensError(Exception):
    """Base class of every error ViT Lens raises on purpose."""


class CheckpointError(ViTLensError):
    """A checkpoint could not be read or does not describe a supported ViT."""


class DownloadError(ViTLensError):
    """A hub download failed (offline, not found, server error, timeout)."""


class IncompatibleCheckpointError(CheckpointError):
    """The tensors in a checkpoint do not fit the model built for it."""

    def __init__(
        self,
        *,
        missing: list[str],
        unexpected: list[str],
        wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        context: str = "",
    ) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.wrong_shape = sorted(wrong_shape)
        parts = [f"checkpoint does not fit the model{' (' + context + ')' if context else ''}:"]
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {_short(self.unexpected)}")
        if self.wrong_shape:
            shapes = [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.wrong_shape]
            parts.append(f"wrong-shape keys ({len(shapes)}): {_short(shapes)}")
        super().__init__(" ".join(parts[:1]) + " " + "; ".join(parts[1:]))  # one line: a CLI error is one line


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name:
    what a one-line user message quotes of a library's error."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _short(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
