"""Process-wide C heap settings for a long-running server (glibc only).

Each image request allocates a few large buffers (the processor's pixel_values:
about 7 MB for a 640x480 image) in one thread and frees them in another. glibc
serves such a buffer with mmap at first, but after the first one is freed it
raises its mmap threshold to that size (up to 32 MB), so later buffers come
from the heap arenas, where freed space is kept rather than returned: resident
memory then sits a few hundred MB above what is live, and moves by as much
from one minute to the next. A fixed threshold keeps big buffers on mmap,
returned to the system when freed. Not a leak fix (that was a reference cycle,
engine/scheduler.py); it makes RSS lower and steadier. Measured with
bench/soak.py (tiny model, 2 CPUs, after the cycle fix): 8 image clients settle
at about 960 MB with 4 MiB (880 MB with 1 MiB) instead of 1050 to 1150 MB;
the load mode's phase-to-phase change was -52 MB with 4 MiB, 0 and -5 MB with
1 MiB, and -4 to +207 MB without. Cost: page faults on every big buffer;
1 MiB served about 20 % fewer load-mode requests on this VM, 4 MiB about 10 %
fewer (within this VM's noise), so 4 MiB is the default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("engine.memory")

M_TRIM_THRESHOLD = -1      # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 4 << 20   # 4 MiB: a pixel_values tensor is larger
ENV_OVERRIDES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version            # only glibc has it (not musl, macOS, Windows)
        return libc
    except (OSError, AttributeError):
        return None


def configure_malloc(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (which also stops its dynamic adjustment of the trim
    threshold). Call once at process start, before the model loads. Leaves the heap alone
    when the user set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_, or off glibc.
    Returns whether the setting was applied."""
    if any(os.environ.get(name) for name in ENV_OVERRIDES):
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) failed; heap settings unchanged",
                    mmap_threshold)
    return ok


def trim() -> bool:
    """Return free heap memory to the system now (glibc's malloc_trim(0)); a diagnostic
    aid, not needed once configure_malloc ran."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


__all__ = ["configure_malloc", "trim"]
