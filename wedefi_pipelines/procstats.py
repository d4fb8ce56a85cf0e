"""This process's peak memory (Linux /proc), for the archive's run metadata."""

from __future__ import annotations

from pathlib import Path


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process, so the next reading is this run's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
