"""Fine-tuning on a packed 2-bit base: the official layout loaded packed, gradient checkpointing, backward
through the packed ops; LoRA adapters (peft) train while the base stays packed and unchanged."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bitnet import BitNetForCausalLM, BitNetTransformer, pack  # noqa: E402
from bitnet.nn import Int8Linear, PackedBitLinear  # noqa: E402

from .test_bitnet_official import VOCAB, write_official  # noqa: E402


@pytest.fixture(autouse=True)
def _no_dynamo():
    with torch.compiler.set_stance("force_eager"):
        yield


def float_elements(model, skip=("lora_",)):
    """Number of floating-point values held in parameters and buffers, adapters excluded."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or any(s in name for s in skip) or t.data_ptr() in seen or not t.dtype.is_floating_point:
            continue
        seen.add(t.data_ptr())
        total += t.numel()
    return total


def packed_snapshot(model):
    """The packed weights and scales by name (peft's ``.base_layer`` wrapper level and prefixes dropped)."""
    return {n.replace(".base_layer", "").removeprefix("base_model.model."): b.clone()
            for n, b in model.named_buffers() if n.endswith(("w_packed", "w_scale", "w_int8"))}


def assert_base_unchanged(model, before):
    now = packed_snapshot(model)
    assert len(now) == len(before)
    for name, value in before.items():
        assert torch.equal(now[name], value), name


def assert_linears_stay_packed(model):
    for name, m in model.named_modules():
        if isinstance(m, PackedBitLinear):
            kinds = {(n, t.dtype, t.dim()) for n, t in list(m.named_buffers(recurse=False)) if t is not None}
            assert kinds == {("w_packed", torch.uint8, 2), ("w_scale", torch.float32, 0)}, name
            assert not list(m.parameters(recurse=False)), name


def test_backward_through_packed_official_model_with_checkpointing(tmp_path):
    write_official(tmp_path)
    model = BitNetForCausalLM.from_pretrained(tmp_path)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()                                     # was: no autograd formula for bitnet.bitlinear_packed
    emb = model.model.embed_tokens.weight.grad
    assert emb is not None and emb.abs().sum() > 0
    assert model.model.layers[0].mlp.down_proj.norm.weight.grad.abs().sum() > 0   # through down_proj's input
    assert model.model.layers[0].input_layernorm.weight.grad.abs().sum() > 0      # through q/k/v's input


def test_lora_on_packed_official_model(tmp_path):
    peft = pytest.importorskip("peft")
    from bitnet.hf.lora import packed_lora_config

    write_official(tmp_path)
    model = BitNetForCausalLM.from_pretrained(tmp_path)
    fp_before = float_elements(model)
    before = packed_snapshot(model)
    model.gradient_checkpointing_enable()
    lora = peft.get_peft_model(model, packed_lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                           "gate_proj", "down_proj"]))
    lora.train()
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert_base_unchanged(model, before)
    assert_linears_stay_packed(model)
    assert float_elements(model) == fp_before          # no fp copy of any base weight appeared


def test_lora_on_packed_bitnet_transformer():
    peft = pytest.importorskip("peft")
    from bitnet.hf.lora import packed_lora_config

    torch.manual_seed(0)
    model = pack(BitNetTransformer(num_tokens=64, dim=64, depth=2, heads=4, kv_heads=2, ff_mult=2, max_seq_len=32,
                                   tie_embeddings=True))
    assert isinstance(model.head, Int8Linear)
    for p in model.parameters():
        p.requires_grad_(False)
    fp_before, before = float_elements(model), packed_snapshot(model)
    model = peft.inject_adapter_in_model(packed_lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                               "up", "down"]), model)
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    model.train()
    losses = []
    for _ in range(10):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])        # through the int8 head and packed blocks
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert_base_unchanged(model, before)
    assert_linears_stay_packed(model)
    assert float_elements(model) == fp_before
