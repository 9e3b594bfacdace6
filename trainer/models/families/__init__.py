"""The model families `model.arch` chooses from. Adding one is a module like llama.py and a line here."""

from __future__ import annotations

from trainer.models.families import gpt2, hf, llama
from trainer.models.families.base import SHAPE_KEYS, Family, set_dropout

FAMILIES: dict[str, Family] = {family.name: family for family in (gpt2.FAMILY, llama.FAMILY, hf.FAMILY)}

__all__ = ["FAMILIES", "SHAPE_KEYS", "Family", "set_dropout"]
