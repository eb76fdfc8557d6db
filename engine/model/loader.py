"""Finding and loading Qwen2.5-VL: `auto`, `tiny`, a local folder, a Hugging
Face hub id or a ModelScope id, onto the selected device."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MODEL, EngineConfig
from .device import Device
from ..errors import ModelLoadError

log = logging.getLogger("engine.loader")

def tiny_warning(path: Path, why: str = "") -> str:
    """The log's loud line when the built-in tiny model serves, with what it knows (its
    folder's marker)."""
    from ..tiny import describe

    return (f"Serving the built-in TINY Qwen2.5-VL{why}, for trying the app and for tests: "
            f"{describe(path)['knows']}. To run the real model use --model {DEFAULT_MODEL} "
            "(needs an NPU or GPU and about 16 GB of weights).")


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    name: str          # what the user asked for / the hub id; shown in the UI and /v1/models
    path: Path         # the local folder the weights came from
    is_tiny: bool
    device: Device


def _hub_cached(repo_id: str) -> Path | None:
    """The local snapshot of a hub model if its config and weights index are cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cfg = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cfg, str):
        folder = Path(cfg).parent
        if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
            return folder
    return None


def download(repo_id: str, modelscope: bool, revision: str | None = None) -> Path:
    """Fetch a model folder (with a progress bar); a clear ModelLoadError on failure."""
    try:
        if modelscope:
            try:
                from modelscope import snapshot_download as ms_download
            except ImportError:
                raise ModelLoadError("--modelscope needs the modelscope package: "
                                     "pip install modelscope") from None
            return Path(ms_download(repo_id, revision=revision or "master"))
        from huggingface_hub import snapshot_download

        log.info("downloading %s from the Hugging Face hub (about 16 GB for the 7B)...", repo_id)
        return Path(snapshot_download(repo_id, revision=revision))
    except ModelLoadError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"Cannot load model {repo_id!r}: not a local folder, and the download "
                             f"failed ({type(exc).__name__}: {first})") from None


def _tiny(path: Path, why: str = "") -> tuple[str, Path, bool]:
    log.warning(tiny_warning(path, why))
    return "tiny", path, True


def resolve_model(spec: str, device: Device, modelscope: bool = False,
                  revision: str | None = None) -> tuple[str, Path, bool]:
    """(display name, local folder, is_tiny) for --model."""
    from ..tiny import ensure_tiny, is_tiny

    spec = (spec or "auto").strip()
    if spec == "tiny":
        return _tiny(ensure_tiny())
    if spec == "auto":
        if device.kind == "cpu":
            return _tiny(ensure_tiny(), " (no NPU or GPU found)")
        cached = None if modelscope else _hub_cached(DEFAULT_MODEL)
        if cached is not None:
            return DEFAULT_MODEL, cached, False
        try:
            return DEFAULT_MODEL, download(DEFAULT_MODEL, modelscope, revision), False
        except ModelLoadError as exc:
            log.warning("%s", exc.message)
            return _tiny(ensure_tiny())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"Cannot load model {spec!r}: the folder has no config.json")
        if is_tiny(path):
            return _tiny(path)
        return spec, path, False
    if spec.count("/") != 1 or spec.startswith(("/", ".", "~")):
        raise ModelLoadError(f"Cannot load model {spec!r}: no such folder, and not a hub id "
                             "like Qwen/Qwen2.5-VL-7B-Instruct")
    cached = None if modelscope else _hub_cached(spec)
    return spec, cached or download(spec, modelscope, revision), False


def load_model(config: EngineConfig, device: Device) -> LoadedModel:
    """Load processor and model onto the device; any failure is a ModelLoadError."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name, path, tiny = resolve_model(config.model, device, config.modelscope, config.revision)
    # A model this small runs faster on one thread: more only add OpenMP hand-offs,
    # which also slow the device thread whenever another thread runs torch operators.
    device.set_cpu_threads(config.cpu_threads or (1 if tiny else None))
    attn = config.attn_implementation or "sdpa"
    kwargs: dict[str, Any] = {"dtype": device.dtype, "attn_implementation": attn}
    if device.kind != "cpu":
        kwargs["device_map"] = {"": str(device.torch_device)}
    try:
        processor = AutoProcessor.from_pretrained(str(path))
        model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(f"Cannot load model {name!r} from {path}: "
                             f"{type(exc).__name__}: {first}") from None
    if device.kind == "cpu":
        model.to(device.torch_device)
    model.eval()
    processor.tokenizer.padding_side = "left"
    log.info("loaded %s from %s on %s (%s attention)", name, path, device.describe(), attn)
    return LoadedModel(model=model, processor=processor, name=name, path=path, is_tiny=tiny,
                       device=device)


