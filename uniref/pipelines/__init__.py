"""Diffusers pipelines of uniref."""

from uniref.pipelines.edit import (
    DefaultModelUnavailableError,
    PipelineLoadError,
    UniRefEditPipeline,
    UniRefEditPipelineOutput,
)
from uniref.pipelines.text_encoders import ByteTextEncoder, PromptEncoder, QwenVLPromptEncoder

__all__ = [
    "ByteTextEncoder",
    "DefaultModelUnavailableError",
    "PipelineLoadError",
    "PromptEncoder",
    "QwenVLPromptEncoder",
    "UniRefEditPipeline",
    "UniRefEditPipelineOutput",
]
