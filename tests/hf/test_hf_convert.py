"""convert_hf_to_bitnet on tiny Llama and GPT-2 models; the lambda warm-up callback."""

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bitnet import BitLinear  # noqa: E402
from bitnet.convert.hf_convert import convert_hf_to_bitnet, quant_strength_at  # noqa: E402
from bitnet.convert import count_bitlinear  # noqa: E402
from bitnet.nn import set_quant_strength  # noqa: E402


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("make, n_linear", [(tiny_llama, 14), (tiny_gpt2, 8)])
def test_warmup_starts_at_the_original_model(make, n_linear):
    torch.manual_seed(0)
    model = make()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        convert_hf_to_bitnet(model, warmup_steps=10)
        assert count_bitlinear(model) == n_linear and model.bitnet_warmup_steps == 10
        assert not isinstance(model.lm_head, BitLinear)
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)   # lambda = 0
        set_quant_strength(model, 1.0)
        assert not torch.allclose(model(ids).logits, ref, atol=1e-3)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "wte" not in n and "wpe" not in n
               and "embed" not in n)


def test_quant_strength_schedule_and_callback():
    assert [quant_strength_at(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert quant_strength_at(0, 0) == 1.0
    from bitnet.hf import QuantWarmupCallback

    model = convert_hf_to_bitnet(tiny_llama(), warmup_steps=4)
    cb = QuantWarmupCallback()
    seen = []
    for step in range(6):
        cb.on_step_begin(None, types.SimpleNamespace(global_step=step), None, model=model)
        seen.append(model.model.layers[0].mlp.up_proj.quant_strength)
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    logs = {}
    cb.on_log(None, None, None, logs=logs)
    assert logs["quant_strength"] == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        convert_hf_to_bitnet(tiny_llama(), warmup_steps=-1)


def test_dequantised_gguf_model_becomes_trainable():
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.trainer_utils import validate_quantization_for_training
    from transformers.utils.quantization_config import GgufConfig

    model = tiny_llama()
    model.hf_quantizer, model.is_quantized = GgufHfQuantizer(GgufConfig(gguf_file="m.gguf")), True
    with pytest.raises(ValueError):
        validate_quantization_for_training(model)                  # what the Trainer refuses
    convert_hf_to_bitnet(model, warmup_steps=2)
    validate_quantization_for_training(model)
