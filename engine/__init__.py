"""Qwen2.5-VL serving engine: device, model loading, prompt rendering and a
background generation worker with per-request token streams.

Importing the package is cheap and torch-free; `engine.local` brings in torch.
"""

from .errors import (DeviceOutOfMemoryError, EngineBusyError, EngineError, InvalidRequestError,
                     ModelLoadError, ModelNotFoundError)
from .types import (Conversation, Event, Finished, GenerationRequest, ImageInput, Message,
                    RequestStats, SamplingParams, TextDelta, VideoInput)

__all__ = ["Conversation", "DeviceOutOfMemoryError", "EngineBusyError", "EngineError", "Event",
           "Finished", "GenerationRequest", "ImageInput", "InvalidRequestError", "Message",
           "ModelLoadError", "ModelNotFoundError", "RequestStats", "SamplingParams", "TextDelta",
           "VideoInput"]
