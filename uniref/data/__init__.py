"""Datasets: one record type (`EditRecord`) and readers for the layouts people already have
(DiffSynth-Studio, musubi-tuner, ai-toolkit, Hugging Face datasets) beside the synthetic world."""

from uniref.data.check import DatasetReport, check_dataset
from uniref.data.readers import SPEC_KINDS, open_dataset
from uniref.data.records import DatasetError, EditRecord, decode_image

__all__ = ["SPEC_KINDS", "DatasetError", "DatasetReport", "check_dataset", "EditRecord", "decode_image", "open_dataset"]
