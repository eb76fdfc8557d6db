"""Which device serves the model, and the Ascend NPU set-up it needs.

`torch_npu` is imported only here and only behind a guard: on a machine
without the CANN toolkit it raises ImportError/OSError/RuntimeError, and we
fall back to CUDA or CPU with a warning instead of crashing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger("engine.device")

DeviceKind = Literal["npu", "cuda", "cpu"]
NPU_ALLOC_ENV = "PYTORCH_NPU_ALLOC_CONF"
NPU_ALLOC_DEFAULT = "max_split_size_mb:256"   # the vllm-ascend tutorial's value


def import_torch_npu() -> Any | None:
    """Import torch_npu if it works here; None (with a warning) if it is missing or broken."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ModuleNotFoundError:
        return None
    except (ImportError, OSError, RuntimeError) as exc:
        log.warning("torch_npu is installed but cannot be loaded (%s: %s); is the CANN toolkit "
                    "installed and set_env.sh sourced? Falling back to CUDA or CPU.",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    return torch_npu


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    # The allocator reads its option when torch_npu initialises: set it first.
    configure_npu_allocator()
    if import_torch_npu() is None:
        return False
    try:
        return bool(torch.npu.is_available())
    except Exception as exc:  # a broken driver raises here rather than at import
        log.warning("torch.npu.is_available() failed (%s); falling back", exc)
        return False


def configure_npu_allocator() -> None:
    """Set the tutorial's allocator option unless the user chose one.

    Must run before the first NPU allocation. `max_split_size_mb` and
    `expandable_segments` must never be combined, so a user value is kept as is.
    """
    if not os.environ.get(NPU_ALLOC_ENV):
        os.environ[NPU_ALLOC_ENV] = NPU_ALLOC_DEFAULT


@dataclass
class Device:
    """The resolved device plus what each thread that touches it must do first."""

    kind: DeviceKind
    index: int = 0
    dtype: torch.dtype = torch.float32
    cpu_threads: int | None = None   # torch intra-op threads on the CPU; None: torch's default

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu") if self.kind == "cpu" else torch.device(self.kind, self.index)

    def bind_thread(self) -> None:
        """Call in every thread that runs the model: NPU contexts are per thread.

        Without this, `generate` in a worker thread fails with
        "The context is empty. Check whether acl.rt.set_context or acl.rt.set_device is called".
        """
        if self.kind == "npu":
            torch.npu.set_device(self.index)
        elif self.kind == "cuda":
            torch.cuda.set_device(self.index)
        elif self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)

    def set_cpu_threads(self, threads: int | None) -> None:
        """Intra-op threads for the CPU, here and (through bind_thread) in the device thread."""
        if self.kind == "cpu" and threads:
            self.cpu_threads = threads
            torch.set_num_threads(threads)

    def empty_cache(self) -> None:
        """Give cached blocks back after an out-of-memory error, so the next request can run."""
        try:
            if self.kind == "npu":
                torch.npu.empty_cache()
            elif self.kind == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # never let cleanup hide the original error
            log.warning("empty_cache failed: %s", exc)

    def describe(self) -> str:
        if self.kind == "cpu":
            threads = self.cpu_threads or torch.get_num_threads()
            return f"CPU ({threads} thread{'s' if threads != 1 else ''}, {_dtype_name(self.dtype)})"
        try:
            mod = torch.npu if self.kind == "npu" else torch.cuda
            name = mod.get_device_name(self.index)
        except Exception:
            name = self.kind.upper()
        return f"{name} ({self.kind}:{self.index}, {_dtype_name(self.dtype)})"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
          "fp32": torch.float32}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, bfloat16, float16, float32") from None


def select_device(requested: str = "auto", dtype: str | None = None, index: int = 0) -> Device:
    """Resolve `--device auto|npu|cuda|cpu` and `--dtype`.

    auto: the NPU when torch_npu imports and reports a device, else CUDA, else CPU.
    Asking for a device that is not there is an error, not a silent fallback.
    dtype: bfloat16 on NPU and CUDA (float16 for Atlas 300I cards via --dtype);
    float32 on CPU, where bfloat16 matmuls are slower on most x86 cores.
    """
    requested = (requested or "auto").lower()
    if requested not in ("auto", "npu", "cuda", "cpu"):
        raise ValueError(f"unknown device {requested!r}; choose auto, npu, cuda or cpu")
    kind: DeviceKind
    if requested == "npu":
        if not npu_available():
            raise RuntimeError("--device npu: no usable Ascend NPU (torch_npu missing, CANN not "
                               "set up, or no device visible)")
        kind = "npu"
    elif requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA GPU is visible")
        kind = "cuda"
    elif requested == "cpu":
        kind = "cpu"
    elif npu_available():
        kind = "npu"
    elif torch.cuda.is_available():
        kind = "cuda"
    else:
        kind = "cpu"

    chosen = parse_dtype(dtype)
    if chosen is None:
        chosen = torch.float32 if kind == "cpu" else torch.bfloat16
    dev = Device(kind=kind, index=index, dtype=chosen)
    if kind == "npu":
        # Precompiled kernels: jit makes the first run very slow and bf16 Conv3D fails under jit.
        torch.npu.set_compile_mode(jit_compile=False)
        dev.bind_thread()
    if kind != "cpu":     # the CPU's threads are picked with the model (load_model)
        log.info("device: %s", dev.describe())
    return dev


