"""Validated configuration, one pydantic schema per stage.

This module is imported by the TUI, so it must stay light: pydantic only, no ML libraries.
Every field has a description and bounds; a bad value is reported with its field name.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
Dtype = Literal["bfloat16", "float16", "float32"]


def check_model_name(name: str) -> str:
    if not MODEL_NAME_RE.match(name):
        raise ValueError(
            f"{name!r} is not a valid model name: use 1-64 lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImportConfig(StageConfig):
    """Bring a base model into the store."""

    source: str = Field(
        description="A catalog name ('default' for the embedded model), a Hugging Face-layout "
        "directory with safetensors weights, or a .gguf file",
        min_length=1,
    )
    name: str | None = Field(
        default=None, description="Name in the store; derived from the source when not given"
    )
    dtype: Dtype = Field(
        default="bfloat16",
        description="Precision of the weights written for a GGUF source (dequantized); "
        "a safetensors directory keeps its own",
    )
    store: str = Field(description="Path of the model store to import into")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        return None if value is None else check_model_name(value)
