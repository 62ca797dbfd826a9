"""transformers Trainer callbacks for BitNet fine-tuning."""

from __future__ import annotations

from transformers import TrainerCallback

from ..convert.hf_convert import quant_strength_at
from ..nn.bitlinear import set_quant_strength


class QuantWarmupCallback(TrainerCallback):
    """Ramps the quantisation strength lambda of every BitLinear linearly 0 -> 1 over ``warmup_steps``.

    ``warmup_steps=None`` reads ``model.bitnet_warmup_steps`` (set by ``convert_hf_to_bitnet``).
    The current lambda is added to the Trainer logs as ``quant_strength``.
    """

    def __init__(self, warmup_steps: int | None = None):
        self.warmup_steps = warmup_steps
        self.strength = None

    def _steps(self, model) -> int:
        return self.warmup_steps if self.warmup_steps is not None else getattr(model, "bitnet_warmup_steps", 0)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.strength = quant_strength_at(state.global_step, self._steps(model))
        set_quant_strength(model, self.strength)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= self._steps(model):
            set_quant_strength(model, 1.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.strength is not None:
            logs["quant_strength"] = self.strength
