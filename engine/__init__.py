"""Qwen2.5-VL serving engine, in the stages a request passes: the input stage
(engine.inputs: media, checks, prompt rendering), the engine core on the device thread
(engine.core: scheduler, runner, KV and prefix caches, sampler, output), the model and its
device (engine.model), and the two backends behind `engine.base.Engine` (engine.backends:
local, remote), picked by `engine.factory.create_engine`.

Importing the package is cheap and torch-free; `engine.backends.local` brings in torch.
"""

from .errors import (DeviceOutOfMemoryError, EngineBusyError, EngineError, InvalidRequestError,
                     ModelLoadError, ModelNotFoundError)
from .types import (Conversation, Event, Finished, GenerationRequest, ImageInput, Message,
                    RequestStats, SamplingParams, TextDelta, VideoInput)

__all__ = ["Conversation", "DeviceOutOfMemoryError", "EngineBusyError", "EngineError", "Event",
           "Finished", "GenerationRequest", "ImageInput", "InvalidRequestError", "Message",
           "ModelLoadError", "ModelNotFoundError", "RequestStats", "SamplingParams", "TextDelta",
           "VideoInput"]
