"""LoRA on compressed layers (QLoRA-style fine-tuning) through peft.

peft wraps the layers it knows (``nn.Linear``, ``Conv1D``, bitsandbytes…);
reparam's compression wrappers are plugged in through peft's documented
custom-module mapping (``LoraConfig._register_custom_module``):

    >>> from peft import LoraConfig, get_peft_model
    >>> from reparam.integrations.peft import register
    >>> config = register(LoraConfig(r=8, target_modules=["query", "value"]))
    >>> model = get_peft_model(compressed_model, config)

The compressed weight stays frozen and compressed; the forward runs the
compressed path and adds the adapters, and gradients reach the adapters (and
the inputs) through it. ``merge_and_unload()`` cannot add a dense update to
bit-planes or factors without re-fitting them, so merging turns the layer
into a dense ``nn.Linear`` holding W + ΔW — the compression is undone for
that layer, by design; keep the adapters separate (``save_pretrained`` of
the peft model) to keep the compressed base.
"""
from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from ..core.module import ReparamModule


class CompressedLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` around a :class:`~reparam.ReparamModule`."""

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # ``weight`` on a wrapper decodes the whole matrix; the bias or any stored tensor tells the device.
        stored = next(base_layer.parameters(), None)
        if stored is None:
            stored = next(base_layer.buffers())
        return stored.device, base_layer.dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the adapters into a dense copy of the base weight (the base becomes an ``nn.Linear``)."""
        base = self.get_base_layer()
        if isinstance(base, ReparamModule):
            dense = base.to_linear()
            dense.requires_grad_(False)
            self.base_layer = dense
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)


def register(config: LoraConfig) -> LoraConfig:
    """Let ``config`` attach LoRA to every reparam compression wrapper; returns ``config``.

    peft does not save this mapping with the adapter: call it again on the
    config used to load adapters onto a compressed model.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register takes a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({ReparamModule: CompressedLoraLinear})
    return config

