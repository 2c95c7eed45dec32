"""SlimFitConfig and its parts: dataclasses validated on construction.

``SlimFitConfig()`` turns every feature on in the formats of the SlimFit paper
(see shared/design/SLIMFIT.md section 5-7); ``SlimFitConfig.off()`` turns every
rewrite off, so a compiled module computes exactly what the original does.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["QuantFormat", "SlimFitConfig", "ConfigError"]

QUANTIZER_KINDS = ("fixed", "minmax")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the fix."""


@dataclass(frozen=True)
class QuantFormat:
    """How one class of saved activations is stored for backward.

    ``kind="fixed"``: the paper's fixed-point format: value = code * step with a
    power-of-two ``step``, round to nearest, clamp to the representable range.
    ``kind="minmax"``: per-group min/max scaling over ``group_size`` consecutive
    elements (one fp32 scale and one fp32 offset per group), optionally with
    stochastic rounding, which never clips large activations.
    """

    bits: int = 8
    kind: str = "fixed"
    step: float = 1 / 16
    signed: bool = True
    group_size: int = 128
    stochastic: bool = False

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise ConfigError(f"QuantFormat.bits must be 2, 4 or 8, got {self.bits!r}")
        if self.kind not in QUANTIZER_KINDS:
            raise ConfigError(f"QuantFormat.kind must be one of {QUANTIZER_KINDS}, got {self.kind!r}")
        if not (self.step > 0):
            raise ConfigError(f"QuantFormat.step must be a positive number, got {self.step!r}")
        if self.kind == "fixed":
            mantissa, exponent = _frexp(self.step)
            if mantissa != 0.5:
                raise ConfigError(
                    f"QuantFormat.step must be a power of two for kind='fixed' (e.g. 1/16), got {self.step!r}"
                )
        if not (isinstance(self.group_size, int) and self.group_size > 0):
            raise ConfigError(f"QuantFormat.group_size must be a positive int, got {self.group_size!r}")

    def nbytes(self, numel: int) -> int:
        """Bytes this format takes for ``numel`` values (codes packed ``8 // bits`` per byte)."""
        per_byte = 8 // self.bits
        codes = -(-numel // per_byte)
        if self.kind == "minmax":
            groups = -(-numel // self.group_size)
            return codes + groups * 2 * 4
        return codes


def _frexp(x: float) -> tuple[float, int]:
    import math

    return math.frexp(x)


def _int8(step=1 / 16, signed=True):
    return QuantFormat(bits=8, kind="fixed", step=step, signed=signed)


@dataclass(frozen=True)
class SlimFitConfig:
    """Which rewrites run, and the format of each class of saved activation.

    Fields named ``*_format`` are ``QuantFormat`` or ``None`` (kept in full precision).
    ``recast_weights``: under autocast, Linear/Conv keep the parameter rather than its
    low-precision copy and cast it again in backward (eager PyTorch keeps the copy).
    """

    freeze_gate: bool = True
    attn_qk_format: QuantFormat | None = field(default_factory=lambda: _int8())
    attn_v_format: QuantFormat | None = field(default_factory=lambda: _int8())
    attn_probs_format: QuantFormat | None = field(default_factory=lambda: _int8(step=1 / 256, signed=False))
    gelu_input_format: QuantFormat | None = field(
        default_factory=lambda: QuantFormat(bits=4, kind="fixed", step=0.5, signed=True)
    )
    ffn_out_input_format: QuantFormat | None = field(default_factory=lambda: _int8())
    prune_layernorm: bool = True
    layernorm_keep_ratio: float = 0.1
    dropout_without_masks: bool = True
    recast_weights: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_format") and value is not None and not isinstance(value, QuantFormat):
                raise ConfigError(f"SlimFitConfig.{f.name} must be a QuantFormat or None, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"SlimFitConfig.{f.name} must be True or False, got {value!r}")
        if not (0.0 < self.layernorm_keep_ratio <= 1.0):
            raise ConfigError(
                f"SlimFitConfig.layernorm_keep_ratio must be in (0, 1], got {self.layernorm_keep_ratio!r} "
                "(0.1 keeps the top 10% of |normalized input|)"
            )

    @classmethod
    def off(cls) -> "SlimFitConfig":
        """Every rewrite off: the compiled module computes exactly what the original does."""
        return cls(
            freeze_gate=False,
            attn_qk_format=None,
            attn_v_format=None,
            attn_probs_format=None,
            gelu_input_format=None,
            ffn_out_input_format=None,
            prune_layernorm=False,
            dropout_without_masks=False,
            recast_weights=False,
        )

    @classmethod
    def minmax(cls, group_size: int = 128, stochastic: bool = False) -> "SlimFitConfig":
        """Every feature on, with the paper's bit widths but per-group min/max scaling
        (``QuantFormat(kind="minmax")``): no clipping and no absolute step, so it
        suits activations of any scale (e.g. small randomly initialised models)."""
        base = cls()
        fmts = {
            f.name: dataclasses.replace(getattr(base, f.name), kind="minmax", group_size=group_size,
                                        stochastic=stochastic)
            for f in dataclasses.fields(cls) if f.name.endswith("_format") and getattr(base, f.name) is not None
        }
        return dataclasses.replace(base, **fmts)

    @property
    def quantizes_attention(self) -> bool:
        return any(f is not None for f in (self.attn_qk_format, self.attn_v_format, self.attn_probs_format))
