"""SlimFitConfig and its parts: dataclasses validated on construction.

Takes field values.  Gives ``QuantFormat`` (how one class of saved activations is stored) and
``SlimFitConfig`` (which rewrites run, and each saved activation's format): ``SlimFitConfig()`` every
feature on in per-group min/max formats at the SlimFit paper's bit widths, ``SlimFitConfig.paper()``
the paper's fixed-point formats, ``SlimFitConfig.off()`` every rewrite off (the original's results).
Never holds an out-of-range value: ``ConfigError`` names the field and the fix.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

__all__ = ["QuantFormat", "SlimFitConfig", "ConfigError", "DROPOUT_MASKS"]

QUANTIZER_KINDS = ("fixed", "minmax")
# How train-mode dropout keeps its mask for backward (SlimFitConfig.dropout_masks).
DROPOUT_MASKS = ("auto", "bits", "replay", "full")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the fix."""


@dataclass(frozen=True)
class QuantFormat:
    """How one class of saved activations is stored for backward.

    ``kind="minmax"`` (the default): per group of ``group_size`` consecutive elements
    of the flattened tensor, an fp32 scale and offset from the group's min and max;
    nothing is clipped whatever the activations' scale.  Optional stochastic rounding.
    ``kind="fixed"``: the SlimFit paper's fixed-point format: value = code * ``step``
    with a power-of-two step, round to nearest, clamp to the representable range
    (``signed`` or not).  Build them with ``QuantFormat.minmax(bits)`` and
    ``QuantFormat.fixed(bits, step)``.
    """

    bits: int = 8
    kind: str = "minmax"
    step: float | None = None
    signed: bool = True
    group_size: int = 128
    stochastic: bool = False

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise ConfigError(f"QuantFormat.bits must be 2, 4 or 8, got {self.bits!r}")
        if self.kind not in QUANTIZER_KINDS:
            raise ConfigError(f"QuantFormat.kind must be one of {QUANTIZER_KINDS}, got {self.kind!r}")
        if self.kind == "fixed":
            if self.step is None or not (self.step > 0):
                raise ConfigError(f"QuantFormat(kind='fixed') needs a positive power-of-two step (e.g. 1/16), "
                                  f"got {self.step!r}")
            if math.frexp(self.step)[0] != 0.5:
                raise ConfigError(
                    f"QuantFormat.step must be a power of two for kind='fixed' (e.g. 1/16), got {self.step!r}")
        elif self.step is not None:
            raise ConfigError(f"QuantFormat.step applies to kind='fixed' only; kind={self.kind!r} scales each "
                              "group by its own min and max (drop step=, or pass kind='fixed')")
        if not (isinstance(self.group_size, int) and self.group_size > 0):
            raise ConfigError(f"QuantFormat.group_size must be a positive int, got {self.group_size!r}")

    @classmethod
    def minmax(cls, bits: int = 8, group_size: int = 128, stochastic: bool = False) -> "QuantFormat":
        """Per-group min/max scaling: ``bits`` per value, an fp32 scale and offset per ``group_size``."""
        return cls(bits=bits, kind="minmax", group_size=group_size, stochastic=stochastic)

    @classmethod
    def fixed(cls, bits: int, step: float, signed: bool = True, stochastic: bool = False) -> "QuantFormat":
        """The paper's fixed point: value = code * ``step`` (a power of two), clamped to ``bits``."""
        return cls(bits=bits, kind="fixed", step=step, signed=signed, stochastic=stochastic)

    def nbytes(self, numel: int) -> int:
        """Bytes this format takes for ``numel`` values (codes packed ``8 // bits`` per byte,
        plus an fp32 scale and offset per group for ``minmax``)."""
        per_byte = 8 // self.bits
        codes = -(-numel // per_byte)
        if self.kind == "minmax":
            groups = -(-numel // self.group_size)
            return codes + groups * 2 * 4
        return codes


def _formats(qk, v, probs, gelu, ffn_out) -> dict:
    return dict(attn_qk_format=qk, attn_v_format=v, attn_probs_format=probs, gelu_input_format=gelu,
                ffn_out_input_format=ffn_out)


@dataclass(frozen=True)
class SlimFitConfig:
    """Which rewrites run, and the format of each class of saved activation.

    Fields named ``*_format`` are ``QuantFormat`` or ``None`` (kept in full precision).
    ``dropout_masks``: how train-mode dropout keeps its mask: ``"bits"`` (one bit per
    element), ``"replay"`` (the RNG state, the mask drawn again in backward), ``"auto"``
    (bits on the CPU, where drawing a mask costs as much as a matmul; replay on
    accelerators, where it is one cheap kernel) or ``"full"`` (eager PyTorch's mask).
    ``recast_weights``: under autocast, Linear/Conv keep the parameter rather than its
    low-precision copy and cast it again in backward (eager PyTorch keeps the copy).
    Decoder patterns (``slimfit_fx.fusions``): ``fuse_gated_mlp`` keeps a gated MLP's gate in
    ``glu_gate_format`` (the GELU input's width), its up-projection in ``glu_up_format`` and, while
    the down-projection trains, its input in ``glu_down_input_format``; ``fuse_rmsnorm`` keeps an
    RMSNorm's normalized input in ``norm_input_format``, or, with ``prune_rmsnorm``, pruned to the
    top ``layernorm_keep_ratio`` while frozen (off by default: every gradient of a pre-norm decoder
    passes through its norms, and pruning them cost accuracy there, docs/ACCURACY.md);
    ``fuse_cross_entropy`` keeps a language-model head's input instead of its log-probabilities and
    recomputes the logits in backward;
    ``relu_bits`` keeps a ReLU's sign bits instead of its output.
    ``checkpoint_input_format``: how a block recomputed in backward (``compile(..., checkpoint=...)``)
    keeps its hidden-states input; ``None`` keeps it exact.
    """

    freeze_gate: bool = True
    attn_qk_format: QuantFormat | None = field(default_factory=lambda: QuantFormat.minmax(8))
    attn_v_format: QuantFormat | None = field(default_factory=lambda: QuantFormat.minmax(8))
    attn_probs_format: QuantFormat | None = field(default_factory=lambda: QuantFormat.minmax(8))
    gelu_input_format: QuantFormat | None = field(default_factory=lambda: QuantFormat.minmax(4))
    ffn_out_input_format: QuantFormat | None = field(default_factory=lambda: QuantFormat.minmax(8))
    prune_layernorm: bool = True
    layernorm_keep_ratio: float = 0.1
    dropout_masks: str = "auto"
    recast_weights: bool = True
    glu_gate_format: QuantFormat | None = field(default_factory=lambda: QuantFormat.minmax(4))
    glu_up_format: QuantFormat | None = field(default_factory=lambda: QuantFormat.minmax(8))
    glu_down_input_format: QuantFormat | None = field(default_factory=lambda: QuantFormat.minmax(8))
    norm_input_format: QuantFormat | None = field(default_factory=lambda: QuantFormat.minmax(8))
    fuse_gated_mlp: bool = True
    fuse_rmsnorm: bool = True
    prune_rmsnorm: bool = False
    fuse_cross_entropy: bool = True
    relu_bits: bool = True
    checkpoint_input_format: QuantFormat | None = field(default_factory=lambda: QuantFormat.minmax(8))

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
        if self.dropout_masks not in DROPOUT_MASKS:
            raise ConfigError(f"SlimFitConfig.dropout_masks must be one of {DROPOUT_MASKS}, got "
                              f"{self.dropout_masks!r}")

    @classmethod
    def off(cls) -> "SlimFitConfig":
        """Every rewrite off: the compiled module computes exactly what the original does."""
        return cls(freeze_gate=False, **_formats(None, None, None, None, None), prune_layernorm=False,
                   dropout_masks="full", recast_weights=False, glu_gate_format=None, glu_up_format=None,
                   glu_down_input_format=None, norm_input_format=None,
                   fuse_gated_mlp=False, fuse_rmsnorm=False, fuse_cross_entropy=False, relu_bits=False,
                   checkpoint_input_format=None)

    @classmethod
    def paper(cls) -> "SlimFitConfig":
        """The SlimFit paper's fixed-point formats (absolute steps: int8 at 1/16, the softmax
        output at 1/256, 4-bit GELU input at 0.5); the tensors the paper has no format for (RMSNorm,
        gated MLPs) keep the default ones.  They clip activations beyond their range
        (int8 at step 1/16 saturates at +-8): for models whose activations are of unit scale."""
        return cls(**_formats(QuantFormat.fixed(8, 1 / 16), QuantFormat.fixed(8, 1 / 16),
                              QuantFormat.fixed(8, 1 / 256, signed=False), QuantFormat.fixed(4, 0.5),
                              QuantFormat.fixed(8, 1 / 16)))

    @classmethod
    def minmax(cls, group_size: int = 128, stochastic: bool = False) -> "SlimFitConfig":
        """The default per-group min/max formats with another group size or stochastic rounding."""
        base = cls()
        fmts = {f.name: dataclasses.replace(getattr(base, f.name), group_size=group_size, stochastic=stochastic)
                for f in dataclasses.fields(cls) if f.name.endswith("_format") and getattr(base, f.name) is not None}
        return dataclasses.replace(base, **fmts)

    @property
    def quantizes_attention(self) -> bool:
        """Whether any attention tensor (Q/K, V, probabilities) is kept quantized."""
        return any(f is not None for f in (self.attn_qk_format, self.attn_v_format, self.attn_probs_format))

    @property
    def compacts_dropout(self) -> bool:
        """Whether dropout keeps less than eager PyTorch's mask."""
        return self.dropout_masks != "full"

    def dropout_mode(self, device_type: str) -> str:
        """``"bits"``, ``"replay"`` or ``"full"``: what dropout keeps on this device type."""
        if self.dropout_masks == "auto":
            return "bits" if device_type == "cpu" else "replay"
        return self.dropout_masks
