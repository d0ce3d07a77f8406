"""Diffusers pipelines of uniref."""

from uniref.pipelines.edit import DefaultModelUnavailableError, UniRefEditPipeline, UniRefEditPipelineOutput
from uniref.pipelines.text_encoders import ByteTextEncoder, PromptEncoder, QwenVLPromptEncoder

__all__ = [
    "ByteTextEncoder",
    "DefaultModelUnavailableError",
    "PromptEncoder",
    "QwenVLPromptEncoder",
    "UniRefEditPipeline",
    "UniRefEditPipelineOutput",
]
