"""BitLlama: config validation, Auto classes, save/load (also as remote code), Trainer, generate."""

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bitnet  # noqa: E402
from bitnet import BitLinear, BitLlamaConfig, BitLlamaForCausalLM, set_quant_strength  # noqa: E402
from bitnet.convert import count_bitlinear  # noqa: E402


def test_bitnet_type_validated():
    with pytest.raises(ValueError, match="'1.58b'.*'1b'"):
        BitLlamaConfig(bitnet_type="2b")
    assert BitLlamaConfig(bitnet_type="1b").bits == 8


@pytest.mark.parametrize("bitnet_type, kind", [("1.58b", "1.58"), ("1b", "1")])
def test_every_decoder_projection_is_bitlinear(bitnet_type, kind, tiny_config):
    torch.manual_seed(0)
    model = BitLlamaForCausalLM(tiny_config(bitnet_type=bitnet_type, bits=6))
    assert count_bitlinear(model) == 7 * 2
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, BitLinear) and layer.self_attn.q_proj.weight_kind == kind
    assert layer.mlp.down_proj.bits == 6
    # SubLN: only o_proj and down_proj normalise their input; embeddings and head stay nn.Linear/Embedding
    assert layer.self_attn.o_proj.norm is not None and layer.mlp.down_proj.norm is not None
    assert layer.self_attn.q_proj.norm is None and layer.mlp.gate_proj.norm is None
    assert type(model.lm_head) is torch.nn.Linear
    # quantisation is live: lambda = 0 gives a different output than lambda = 1
    ids = torch.randint(3, 96, (1, 8))
    full = model(ids).logits
    set_quant_strength(model, 0.0)
    assert not torch.allclose(full, model(ids).logits)


def test_save_load_auto_classes_and_remote_code(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = BitLlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 96, (2, 9))
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "bitllama" and cfg["bitnet_type"] == "1.58b"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_bitllama.BitLlamaForCausalLM"
    for name in ("modeling_bitllama.py", "configuration_bitllama.py"):
        source = (tmp_path / name).read_text()
        assert "import bitnet" not in source and "from bitnet" not in source

    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), BitLlamaConfig)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is BitLlamaForCausalLM
    torch.testing.assert_close(loaded(ids).logits, ref)

    # what someone with only the folder gets: the copied modules, their own BitLinear, same logits
    # (with bitnet imported, Auto classes prefer the registered local class; load the copied module directly)
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    remote_cls = get_class_from_dynamic_module("modeling_bitllama.BitLlamaForCausalLM", str(tmp_path))
    remote = remote_cls.from_pretrained(tmp_path).eval()
    assert type(remote).__module__.startswith("transformers_modules")
    assert not isinstance(remote.model.layers[0].mlp.up_proj, BitLinear)
    assert not any(name.startswith("bitnet") for name in
                   (type(m).__module__ for m in remote.modules()))
    torch.testing.assert_close(remote(ids).logits, ref)


def test_import_bitnet_does_not_import_transformers():
    import subprocess

    code = "import sys, bitnet; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_generate_variants(tiny_config):
    torch.manual_seed(0)
    model = BitLlamaForCausalLM(tiny_config()).eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert greedy.shape == (1, 10) and torch.equal(greedy[:, :4], ids)
    assert torch.equal(greedy, model.generate(ids, max_new_tokens=6, do_sample=False))   # deterministic
    # the KV-cached greedy path agrees with a full forward argmax at every step
    step = ids
    for _ in range(6):
        nxt = model(step).logits[:, -1].argmax(-1, keepdim=True)
        step = torch.cat([step, nxt], dim=1)
    assert torch.equal(step, greedy)
    torch.manual_seed(1)
    sampled = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=20, temperature=0.9,
                             repetition_penalty=1.3)
    assert sampled.shape == (1, 9)


def test_gradient_checkpointing_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = BitLlamaForCausalLM(tiny_config()).train()
    ids = torch.randint(3, 96, (2, 12))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_lowers_loss(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = BitLlamaForCausalLM(tiny_config())
    # tiny corpus: a repeated pattern the model can learn in a few steps
    seq = torch.tensor(([1] + list(range(10, 20))) * 3)[:32]
    data = [{"input_ids": seq, "labels": seq} for _ in range(8)]

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(seq[None], labels=seq[None]).loss.item()

    before = eval_loss()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2, learning_rate=5e-3,
        warmup_steps=2, logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
        adam_beta2=0.95, disable_tqdm=True, dataloader_num_workers=0)
    model.gradient_checkpointing_enable()
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    after = eval_loss()
    assert after < before - 1.0, (before, after)
