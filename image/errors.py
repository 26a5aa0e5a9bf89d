"""Typed errors of the image area, each with its own exit code (docs/image.md lists them)."""

from __future__ import annotations

from pitstop.errors import PitstopError


class RecipeError(PitstopError, ValueError):
    """A recipe is invalid: unknown key, wrong type, a value out of range, a missing file, partitions that do
    not fit. Raised before anything is built; the message names the file and the key."""

    exit_code = 30


class ImageBuildError(PitstopError):
    """A build step cannot produce its output (a rootfs larger than its slot, a tool's output not as expected)."""

    exit_code = 31


class FlashError(PitstopError):
    """The flash target is refused (mounted, in use, the host's own disk, too small) or did not read back what
    was written."""

    exit_code = 32


class BmapError(PitstopError, ValueError):
    """A block map (.bmap) is malformed, does not belong to the image, or the image does not match its
    checksums."""

    exit_code = 33


class ProvisionError(PitstopError):
    """Per-device data cannot be written into the data partition (no data partition, filesystem not clean,
    a bad device id, the factory CA unusable)."""

    exit_code = 34
