"""LoRA adapters (``peft``) on a packed 2-bit base: fine-tuning that never materialises fp weights.

The packed layers (:class:`bitnet.nn.PackedBitLinear`, and :class:`bitnet.hf.bitnet_official.HFPackedBitLinear`
of the official layout) are differentiable with respect to their input (straight-through the
activation quantiser, through the frozen ternary weights; :func:`bitnet.ops.ternary_input_grad`), so a
LoRA branch ``y = base(x) + B(A(dropout(x))) * alpha / r`` trains on top of them. ``peft`` does not know
these layer types; :func:`packed_lora_config` returns a ``peft.LoraConfig`` that maps them to peft's
own LoRA ``Linear`` wrapper, which calls the base layer as it is::

    from peft import get_peft_model
    from bitnet.hf.lora import packed_lora_config

    model = BitNetForCausalLM.from_pretrained(folder)          # packed: uint8 weights + fp32 scales
    model.gradient_checkpointing_enable()
    model = get_peft_model(model, packed_lora_config(r=8, target_modules=["q_proj", "v_proj"]))

Merging an adapter into the ternary weights (``merge_and_unload``) is not possible: the sum is no
longer ternary. Keep the adapter separate (``save_pretrained`` of the peft model writes only it).
"""

from __future__ import annotations


def packed_lora_config(**kwargs):
    """``peft.LoraConfig(**kwargs)`` that also targets bitnet's packed linear layers."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError as err:
        raise ImportError("LoRA adapters need peft: pip install peft") from err
    from ..nn.packed import PackedBitLinear

    config = LoraConfig(**kwargs)
    config._register_custom_module({PackedBitLinear: LoraLinear})      # peft's documented custom-layer hook
    return config


__all__ = ["packed_lora_config"]
