"""What a training task is: its name. The task objects the trainer runs are defined below it."""

from __future__ import annotations

from typing import Literal

__all__ = ["TaskName"]

TaskName = Literal["vae", "sft", "msgrpo"]
