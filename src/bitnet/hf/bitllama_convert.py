"""A BitLlama folder (``BitLlamaForCausalLM.save_pretrained``) as a :class:`bitnet.models.BitNetTransformer`.

The architectures match one to one (both are Llama with BitLinear projections and the SubLN sub-norms):

    model.embed_tokens                      -> embed
    layers.N.input_layernorm                -> layers.N.attn_norm
    layers.N.self_attn.{q,k,v}_proj         -> layers.N.attn.{q,k,v}_proj
    layers.N.self_attn.o_proj.norm          -> layers.N.attn.sub_norm      (RMSNorm before o_proj)
    layers.N.self_attn.o_proj               -> layers.N.attn.out_proj
    layers.N.post_attention_layernorm       -> layers.N.ffn_norm
    layers.N.mlp.{gate,up}_proj             -> layers.N.ffn.{gate,up}
    layers.N.mlp.down_proj.norm             -> layers.N.ffn.post_norm      (RMSNorm before down_proj)
    layers.N.mlp.down_proj                  -> layers.N.ffn.down
    model.norm, lm_head                     -> norm, head

The weights stay the fp master weights (training form); ``bitnet.pack`` then packs them. Only what
BitNetTransformer computes is accepted: rotate-half rotary without scaling, no biases, sub-norms on,
``hidden_act`` in silu / gelu / relu2, ``head_dim == hidden_size / num_attention_heads``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..io import CheckpointError

ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "relu2": "relu2"}
_RENAMES = (
    (r"^model\.embed_tokens\.", "embed."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "head."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.norm\.", r"layers.\1.attn.sub_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attn.out_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"layers.\1.attn.\2_proj."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.norm\.", r"layers.\1.ffn.post_norm."),
    (r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.", r"layers.\1.ffn.\2."),
)


def transformer_kwargs(config: dict, source) -> dict:
    """BitNetTransformer kwargs from a BitLlama config.json dict; CheckpointError naming the field."""
    def need(key):
        if key not in config:
            raise CheckpointError(f"{source}: config.json has no {key!r}")
        return config[key]

    dim, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    hidden = int(need("intermediate_size"))
    act = config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported; BitNetTransformer runs "
                              f"{', '.join(ACTIVATIONS)}")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise CheckpointError(f"{source}: attention_bias / mlp_bias are not supported (BitNetTransformer has none)")
    if config.get("sub_norm", True) is False:
        raise CheckpointError(f"{source}: sub_norm=False is not supported (BitNetTransformer always has the sub-norms)")
    head_dim = config.get("head_dim")
    if head_dim not in (None, dim // heads):
        raise CheckpointError(f"{source}: head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                              f"{dim // heads}, which BitNetTransformer requires")
    rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{source}: rope scaling {rope!r} is not supported by BitNetTransformer's rotary table")
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    weights = {"1.58b": "1.58", "1b": "1"}.get(config.get("bitnet_type", "1.58b"))
    if weights is None:
        raise CheckpointError(f"{source}: bitnet_type must be '1.58b' or '1b', got {config.get('bitnet_type')!r}")
    return dict(num_tokens=int(need("vocab_size")), dim=dim, depth=int(need("num_hidden_layers")), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads), ff_mult=(hidden + 0.5) / dim,
                max_seq_len=int(config.get("max_position_embeddings", 2048)), weights=weights,
                bits=int(config.get("bits", 8)), activation=ACTIVATIONS[act], rope_base=rope_theta,
                norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def rename(key: str) -> str | None:
    """Our name for a BitLlama tensor name (None for names we do not store, e.g. rotary buffers)."""
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


@torch.no_grad()
def bitllama_to_transformer(folder, config: dict | None = None) -> torch.nn.Module:
    """The BitLlama checkpoint in ``folder`` as a training-form BitNetTransformer (fp32, eval mode).

    ``config``: the folder's config.json when the caller has read it already (not read again)."""
    from ..io import load_state_into
    from ..models import BitNetTransformer
    from .bitnet_official import read_safetensors_folder

    folder = Path(folder)
    if config is None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    kwargs = transformer_kwargs(config, folder)
    state = {}
    for key, t in read_safetensors_folder(str(folder)).items():
        new = rename(key)
        if new is None:
            continue
        state[new] = t.float()
    if kwargs["tie_embeddings"]:
        state.pop("head.weight", None)
    model = BitNetTransformer(**kwargs)
    load_state_into(model, state, {"head.weight": "embed.weight"} if kwargs["tie_embeddings"] else {}, folder)
    return model.eval()


__all__ = ["bitllama_to_transformer", "rename", "transformer_kwargs"]
