"""The model families by name: arch name -> (config class, model class), and the config factory.

    from lightning_jax.models.registry import build_model_config, model_class
    config = build_model_config(ModelSpec(arch="tnl", preset="tiny", overrides={"num_layers": 3}))
    model = model_class("tnl")(config, rngs=nnx.Rngs(0))

A preset is a classmethod of the config dataclass (`TNLConfig.tiny`, `TransformerConfig.transformer_385m`);
overrides replace fields of the preset. Errors are `ArgumentError`s whose `field` is relative to the
model spec (``preset``, ``num_heads``), so a caller nests them with `.under(...)`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Protocol

from lightning_jax.checks import ArgumentError, check_choice
from lightning_jax.models.config import TNLConfig, TransformerConfig
from lightning_jax.models.tnl import TNL
from lightning_jax.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One model family: its frozen config dataclass and the nnx module built from it."""

    name: str
    config_class: type
    model_class: type

    @property
    def presets(self) -> list[str]:
        """The preset classmethods defined on the config class, sorted."""
        return sorted(n for n, v in vars(self.config_class).items() if isinstance(v, classmethod))

    @property
    def fields(self) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(self.config_class))


ARCHITECTURES: dict[str, Architecture] = {
    "tnl": Architecture("tnl", TNLConfig, TNL),
    "transformer": Architecture("transformer", TransformerConfig, Transformer),
}


class ModelSpecLike(Protocol):
    """What `build_model_config` reads (lightning_jax.training.config.ModelSpec is one)."""

    arch: str
    preset: str
    overrides: Mapping[str, Any]


def architecture(arch: str) -> Architecture:
    """The family named `arch`; ArgumentError on field ``arch`` for an unknown name."""
    return ARCHITECTURES[check_choice("arch", arch, ARCHITECTURES)]


def model_class(arch: str) -> type:
    """The nnx module class of `arch` (`TNL` or `Transformer`)."""
    return architecture(arch).model_class


def build_model_config(spec: ModelSpecLike):
    """The frozen model config: preset `spec.preset` of `spec.arch`'s config class with
    `spec.overrides` replaced. Raises ArgumentError naming the field (``preset``, an unknown
    override, or the config field the config's own checks reject)."""
    arch = architecture(spec.arch)
    presets = arch.presets
    if spec.preset not in presets:
        raise ArgumentError("preset", f"got {spec.preset!r}, expected one of {presets} for {arch.name}")
    for name in spec.overrides:
        if name not in arch.fields:
            raise ArgumentError(name, f"unknown field of {arch.config_class.__name__}, expected one of {arch.fields}")
    try:
        return getattr(arch.config_class, spec.preset)(**spec.overrides)
    except ArgumentError:
        raise
    except (TypeError, ValueError) as e:
        raise _as_argument_error(e) from e


# A message that starts with a field name: "num_heads: got 5, ...".
_FIELD_MESSAGE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.DOTALL)


def _as_argument_error(error: Exception) -> ArgumentError:
    """An error of a model config's checks as an ArgumentError: its `field` if it has one, else the
    field its message starts with (``name: got ...``), else the whole message on no field."""
    field = getattr(error, "field", None)
    if isinstance(field, str):
        return ArgumentError(field, getattr(error, "detail", None) or str(error))
    match = _FIELD_MESSAGE.match(str(error))
    if match:
        return ArgumentError(match.group(1), match.group(2))
    return ArgumentError("", str(error))
