"""The official BitNet b1.58 checkpoints (microsoft/bitnet-b1.58-2B-4T and its bf16 variant) on our kernels.

Architecture: Llama with squared-ReLU gate (``hidden_act="relu2"``), an RMSNorm ``attn_sub_norm`` before
``o_proj`` and ``ffn_sub_norm`` before ``down_proj``, tied embeddings. Here it is a
``transformers.LlamaForCausalLM`` (so ``generate()`` and the KV cache are transformers') whose seven
decoder projections are replaced by

* :class:`HFPackedBitLinear` (default), a ``bitnet.nn.PackedBitLinear``: 2-bit I2-packed ternary weight +
  fp32 scale, int8 per-token activations, run by ``bitnet.ops.bitlinear_packed`` (native CPU / Triton /
  reference backend, ``bitnet.ops.backend()`` says which);
* ``bitnet.nn.BitLinear`` with ``trainable=True``: fp master weights, fake quantisation (fine-tuning).

The sub-norms live inside the layers that read them (``o_proj.norm``, ``down_proj.norm``), so the
official names are mapped on load and mapped back on save. Checkpoint formats (``quantization_config``
with ``quant_method="bitnet"``, ``linear_class="autobitlinear"``):

* ``quantization_mode="offline"``: uint8 weights in the HF layout (:mod:`bitnet.convert.hf_bitnet`) and
  a ``weight_scale`` per linear that multiplies the output;
* ``quantization_mode="online"``: bf16 master weights, quantised as transformers' ``AutoBitLinear``
  does (:func:`hf_online_weight_quant`: the scale is ``mean|W|`` clamped to 1e-5, not the paper's
  ``mean|W| + eps`` divisor), so our logits match transformers' own forward of that checkpoint.

Fine-tuning: the packed layers are differentiable with respect to their input (frozen ternary weights,
straight-through the activation quantiser), so ``gradient_checkpointing_enable()``, ``train()`` and
adapters (:mod:`bitnet.hf.lora`) work on the packed model without any fp copy of its weights.
"""

from __future__ import annotations

import json
import os
import re

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..convert.hf_bitnet import pack_hf_bitnet, unpack_hf_bitnet
from ..nn.bitlinear import BitLinear, check_in_features
from ..nn.packed import PackedBitLinear
from ..quant import fake_quant_activation, pack_i2, ste, unpack_i2

PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUB_NORMS = {"self_attn.attn_sub_norm": "self_attn.o_proj.norm", "mlp.ffn_sub_norm": "mlp.down_proj.norm"}
QUANT_CONFIG = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
_LLAMA_KEYS = set(LlamaConfig().to_dict())


class HFPackedBitLinear(PackedBitLinear):
    """``bitnet.nn.PackedBitLinear`` (I2-packed ternary weight ``w_packed``, fp32 ``w_scale``, int8 per-token
    activations through ``bitnet.ops.bitlinear_packed``) built from the official layout's arguments.

    ``y = (xq @ Wq^T) * w_scale / s``, with ``w_scale`` the checkpoint's ``weight_scale``. ``norm`` (RMSNorm
    on the input) is the official ``attn_sub_norm`` / ``ffn_sub_norm``.
    """

    def __init__(self, in_features, out_features, norm=False, norm_eps=1e-5, bits=8, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, bits=bits, norm=norm, norm_eps=norm_eps,
                         weight_kind="1.58", device=device)
        if self.norm is not None and dtype is not None:
            self.norm.to(dtype)

    def ternary_weight(self) -> torch.Tensor:
        """The ternary values (out, in) as int8."""
        return unpack_i2(self.w_packed, self.in_features, torch.int8)


HF_SCALE_MIN = 1e-5
"""transformers' ``WeightQuant`` clamps ``mean|W|`` to this before inverting it."""


def hf_online_weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary quantisation of transformers' online BitNet layers (``AutoBitLinear(online_quant=True)``).

    ``inv = 1 / clamp(mean|W|, 1e-5)``, ``Wq = clamp(round(W * inv), -1, 1)``, dequantised ``Wq / inv``.
    Returns ``(Wq in w's dtype, scale = 1 / inv as a 0-dim float32)``, computed in float32 as transformers
    does. (Our own models keep the paper's ``W / (mean|W| + eps)``, :func:`bitnet.quant.ternary_weight_quant`.)
    """
    wf = w.float()
    inv = 1.0 / wf.detach().abs().mean().clamp(min=HF_SCALE_MIN)
    return (wf * inv).round().clamp(-1, 1).to(w.dtype), (1.0 / inv).detach()


class HFOnlineBitLinear(BitLinear):
    """``bitnet.nn.BitLinear`` (fp master weights, fake quantisation, STE) with the weight rule of
    transformers' online BitNet layers (:func:`hf_online_weight_quant`): the trainable form of an online
    (bf16 master weight) checkpoint, so training starts from exactly the network transformers runs."""

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return hf_online_weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_in_features(x, self.in_features, "HFOnlineBitLinear")
        if self.norm is not None:
            x = self.norm(x)
        x = fake_quant_activation(x, self.bits, self.quant_strength)          # xq / s, STE
        q, scale = self.quantized_weight()
        w = ste(self.weight, (q.float() * scale).to(self.weight.dtype), self.quant_strength)   # Wq / inv, STE
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def llama_config_from_bitnet(config) -> LlamaConfig:
    """A LlamaConfig (relu2, tied embeddings unless said otherwise) from a BitNet config dict / object."""
    d = dict(config if isinstance(config, dict) else config.to_dict())
    d.setdefault("hidden_act", "relu2")
    d.setdefault("tie_word_embeddings", True)
    d.setdefault("rms_norm_eps", 1e-5)
    kept = {k: v for k, v in d.items()
            if k in _LLAMA_KEYS or k in ("rope_theta", "rope_scaling")}
    kept.pop("model_type", None)
    return LlamaConfig.from_dict(kept)


def _resolve(path_or_id, **hub_kwargs) -> str:
    if os.path.isdir(path_or_id):
        return str(path_or_id)
    if os.path.exists(path_or_id) or str(path_or_id).startswith((".", "/")) or str(path_or_id).count("/") != 1:
        raise FileNotFoundError(f"{path_or_id!r} is not a checkpoint folder (config.json + *.safetensors)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                 **hub_kwargs)
    except Exception as err:   # noqa: BLE001 -- re-raised with the cause attached
        raise OSError(
            f"cannot download {path_or_id!r}: the Hugging Face Hub is offline or unreachable from here "
            f"({type(err).__name__}). Download the checkpoint elsewhere and pass its local folder."
        ) from err


def read_safetensors_folder(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a folder: ``model.safetensors`` or the shards named by ``model.safetensors.index.json``."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} holds neither model.safetensors nor model.safetensors.index.json")
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(folder, shard)))
    return state


class BitNetForCausalLM(LlamaForCausalLM):
    """BitNet b1.58 causal LM in the official Hugging Face layout, on bitnet's packed kernels.

    ``BitNetForCausalLM.from_pretrained(folder_or_hub_id)`` reads offline (packed uint8) or online (bf16)
    checkpoints; ``save_pretrained(folder)`` writes the offline layout that transformers' own
    ``BitNetForCausalLM`` loads. ``BitNetForCausalLM(config, trainable=False)`` builds a fresh model.
    """

    config_class = LlamaConfig

    def __init__(self, config, trainable: bool = False, online_quant: bool = False):
        config = config if isinstance(config, LlamaConfig) else llama_config_from_bitnet(config)
        super().__init__(config)
        self.trainable = trainable
        trainable_cls = HFOnlineBitLinear if online_quant else BitLinear
        for layer in self.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name in PROJ_NAMES:
                    lin = getattr(parent, name, None)
                    if lin is None:
                        continue
                    norm = name in ("o_proj", "down_proj")
                    dev = lin.weight.device
                    if trainable:
                        new = trainable_cls(lin.in_features, lin.out_features, norm=norm,
                                            norm_eps=config.rms_norm_eps, device=dev, dtype=lin.weight.dtype)
                    else:
                        new = HFPackedBitLinear(lin.in_features, lin.out_features, norm=norm,
                                                norm_eps=config.rms_norm_eps, device=dev, dtype=lin.weight.dtype)
                    setattr(parent, name, new)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_id, dtype: torch.dtype = torch.float32, trainable: bool = False,
                        **hub_kwargs) -> "BitNetForCausalLM":
        """Load an official-layout checkpoint (local folder, or hub id when the hub is reachable).

        Args:
            dtype: dtype of embeddings, norms and activations (float32 default; bf16 on GPU).
            trainable: build ``bitnet.nn.BitLinear`` layers with fp master weights (for fine-tuning)
                instead of packed inference layers. For offline checkpoints the master weight is
                ``W = Wq * weight_scale / p`` (p = fraction of non-zeros), whose absmean quantisation
                gives back exactly ``Wq`` and ``weight_scale``.
        """
        folder = _resolve(path_or_id, **hub_kwargs)
        with open(os.path.join(folder, "config.json")) as f:
            raw = json.load(f)
        qc = raw.get("quantization_config") or {}
        if qc and qc.get("quant_method") != "bitnet":
            raise ValueError(f"quantization_config.quant_method must be 'bitnet', got {qc.get('quant_method')!r}")
        mode = qc.get("quantization_mode", "offline") if qc else "online"
        if mode not in ("offline", "online"):
            raise ValueError(f"quantization_mode must be 'offline' or 'online', got {mode!r}")
        config = llama_config_from_bitnet(raw)
        with torch.device("meta"):
            model = cls(config, trainable=trainable, online_quant=mode == "online")
        state = read_safetensors_folder(folder)
        model.load_state_dict(model._from_official(state, mode, dtype), strict=True, assign=True)
        model.model.rotary_emb = LlamaRotaryEmbedding(config)          # non-persistent buffers left on meta
        if config.tie_word_embeddings or "lm_head.weight" not in state:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.bitnet_config = raw
        model.eval()
        return model

    def _from_official(self, state: dict, mode: str, dtype) -> dict:
        out = {}
        for key, t in state.items():
            for official, ours in SUB_NORMS.items():
                key = key.replace(official, ours)
            proj = re.search(r"\.(%s)\.(weight|weight_scale)$" % "|".join(PROJ_NAMES), key)
            if proj is None:
                out[key] = t.to(dtype)
                continue
            if proj.group(2) == "weight_scale":
                continue
            prefix = key[: -len(".weight")]
            if mode == "offline":
                values = unpack_hf_bitnet(t, torch.int8)                    # (out, in) ternary
                scale = state[prefix + ".weight_scale"].float().reshape(())
            else:                                                           # transformers' online rule
                values, scale = hf_online_weight_quant(t)
                values = values.to(torch.int8)
            if self.trainable:
                if mode == "online":
                    out[prefix + ".weight"] = t.to(dtype)
                else:
                    p = values.float().abs().mean().clamp(min=1.0 / values.numel())
                    out[prefix + ".weight"] = (values.float() * (scale / p)).to(dtype)
            else:
                out[prefix + ".w_packed"] = pack_i2(values)
                out[prefix + ".w_scale"] = scale
        if "lm_head.weight" not in out:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out

    # ---------------------------------------------------------------- saving
    def official_state_dict(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """State dict in the offline official layout (uint8 HF-packed weights, ``weight_scale`` [1])."""
        out = {}
        for name, module in self.named_modules():
            if isinstance(module, (HFPackedBitLinear, BitLinear)):
                if isinstance(module, HFPackedBitLinear):
                    values, scale = module.ternary_weight(), module.w_scale
                else:
                    values, scale = module.quantized_weight()
                out[name + ".weight"] = pack_hf_bitnet(values.to(torch.int8)).contiguous()
                out[name + ".weight_scale"] = scale.detach().reshape(1).to(dtype)
        skip = (".w_packed", ".w_scale")
        for key, t in self.state_dict().items():
            if key.endswith(skip) or key == "lm_head.weight" or re.search(r"_proj\.(weight|bias)$", key):
                continue
            for official, ours in SUB_NORMS.items():
                key = key.replace(ours, official)
            out[key] = t.detach().to(dtype).contiguous()
        return out

    def save_pretrained(self, save_directory, max_shard_size: int | None = None,
                        dtype: torch.dtype = torch.bfloat16, **_ignored) -> None:
        """Write config.json and safetensors (sharded with an index when ``max_shard_size`` bytes is given)."""
        os.makedirs(save_directory, exist_ok=True)
        raw = dict(getattr(self, "bitnet_config", None) or self.config.to_dict())
        raw.update(model_type="bitnet", architectures=["BitNetForCausalLM"], quantization_config=dict(QUANT_CONFIG),
                   tie_word_embeddings=True, hidden_act=self.config.hidden_act,
                   torch_dtype=str(dtype).replace("torch.", ""))
        raw.pop("auto_map", None)
        _atomic_write(os.path.join(save_directory, "config.json"),
                      lambda tmp: open(tmp, "w").write(json.dumps(raw, indent=2, sort_keys=True)))
        state = self.official_state_dict(dtype)
        meta = {"format": "pt"}
        if not max_shard_size:
            _atomic_write(os.path.join(save_directory, "model.safetensors"),
                          lambda tmp: save_file(state, tmp, metadata=meta))
            return
        shards, current, size = [], {}, 0
        for key, t in state.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_size:
                shards.append(current)
                current, size = {}, 0
            current[key], size = t, size + nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_write(os.path.join(save_directory, fname), lambda tmp, shard=shard: save_file(shard, tmp, metadata=meta))
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        _atomic_write(os.path.join(save_directory, "model.safetensors.index.json"),
                      lambda tmp: open(tmp, "w").write(index))


def _atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a crash never leaves a half-written file at ``path``."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)




__all__ = ["BitNetForCausalLM", "HFOnlineBitLinear", "HFPackedBitLinear", "hf_online_weight_quant",
           "llama_config_from_bitnet", "read_safetensors_folder", "to_bitnet_transformer"]


@torch.no_grad()
def to_bitnet_transformer(model: "BitNetForCausalLM", head: str = "int8"):
    """The same network as a packed :class:`bitnet.models.BitNetTransformer`, which decodes on the fused
    native CPU path (one native call per block) and works with ``bitnet.generate`` / chat / serve.

    The architectures match one to one: input_layernorm -> ``attn_norm``, q/k/v/o_proj -> ``attn.*``,
    attn_sub_norm -> ``attn.sub_norm``, post_attention_layernorm -> ``ffn_norm``, gate/up/down_proj ->
    ``ffn.gate/up/down``, ffn_sub_norm -> ``ffn.post_norm`` (relu² gate, rotary with ``rope_theta``).
    Packed weights and scales are shared bytes for bytes; embeddings, norms and the head become float32.

    Args:
        model: a packed (not ``trainable``) :class:`BitNetForCausalLM`.
        head: ``"int8"`` (default, as :func:`bitnet.pack`) or ``"fp"`` (keep the float head).
    """
    from ..storage.pack import pack
    from ..models import BitNetTransformer
    from ..nn.int8_linear import Int8Linear

    if head not in ("int8", "fp"):
        raise ValueError(f"head must be 'int8' or 'fp', got {head!r}")
    if getattr(model, "trainable", False):
        raise ValueError("model must be the packed form (BitNetForCausalLM.from_pretrained(..., trainable=False))")
    cfg = model.config
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope!r} is not supported by BitNetTransformer's rotary table")
    rope_theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if cfg.hidden_act != "relu2":
        raise ValueError(f"hidden_act must be 'relu2' (the BitNet b1.58 layout), got {cfg.hidden_act!r}")
    dim, hidden = cfg.hidden_size, cfg.intermediate_size
    kwargs = dict(num_tokens=cfg.vocab_size, dim=dim, depth=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                  kv_heads=cfg.num_key_value_heads, ff_mult=(hidden + 0.5) / dim,      # int(dim * ff_mult) == hidden
                  max_seq_len=cfg.max_position_embeddings, activation="relu2",
                  rope_base=rope_theta, norm_eps=cfg.rms_norm_eps,
                  tie_embeddings=bool(cfg.tie_word_embeddings))
    with torch.device("meta"):
        out = BitNetTransformer(**kwargs)
    pack(out, head="fp")
    f32 = lambda t: t.detach().to(torch.float32)                                      # noqa: E731
    state = {"embed.weight": f32(model.model.embed_tokens.weight), "norm.weight": f32(model.model.norm.weight)}
    if not cfg.tie_word_embeddings:
        state["head.weight"] = f32(model.lm_head.weight)
    proj = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
            "attn.out_proj": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj",
            "ffn.down": "mlp.down_proj"}
    for i, src in enumerate(model.model.layers):
        p = f"layers.{i}."
        state[p + "attn_norm.weight"] = f32(src.input_layernorm.weight)
        state[p + "ffn_norm.weight"] = f32(src.post_attention_layernorm.weight)
        state[p + "attn.sub_norm.weight"] = f32(src.self_attn.o_proj.norm.weight)
        state[p + "ffn.post_norm.weight"] = f32(src.mlp.down_proj.norm.weight)
        for ours, theirs in proj.items():
            lin = src.get_submodule(theirs)
            state[p + ours + ".w_packed"] = lin.w_packed
            state[p + ours + ".w_scale"] = lin.w_scale
    missing, unexpected = out.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"layout mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        out.head.weight = out.embed.weight
    for layer in out.layers:                                      # ffn_sub_norm uses rms_norm_eps too
        layer.ffn.post_norm.eps = cfg.rms_norm_eps
    for m in out.modules():                                       # rotary tables were left on meta
        if hasattr(m, "build_tables"):
            m.build_tables(torch.device("cpu"))
    if head == "int8":
        out.head = Int8Linear.from_linear(out.head)              # the embedding table stays float32
    return out.eval()
