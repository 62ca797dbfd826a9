"""One loader for every command: ``bitnet.load(MODEL)`` -> :class:`LoadedModel`.

``MODEL`` may be any of :data:`ACCEPTED_FORMATS`; whatever it is, the result is a
:class:`~bitnet.models.BitNetTransformer` in eval mode (packed on the CPU by default, so decoding
runs on the fused native path with an int8 head), its tokenizer, and what the checkpoint says about
generating with it (``generation_config.json`` defaults, chat template, end-of-turn / eos ids, context
length). ``bitnet generate | chat | serve | eval | pack``, :class:`~bitnet.generate.BitNetInference` and
the server all load through :func:`load`.

Detection, in this order:

1. an existing ``.gguf`` file -> :func:`bitnet.convert.gguf_import.load_gguf`;
2. an existing folder whose ``config.json`` has ``model_type`` ``"bitnet"`` (the official
   microsoft/bitnet-b1.58-2B-4T layout, offline uint8 or online bf16, single file or sharded) ->
   :class:`bitnet.hf.BitNetForCausalLM` then :func:`bitnet.hf.to_bitnet_transformer` (same bytes);
3. ... ``model_type`` ``"bitllama"`` (``BitLlamaForCausalLM.save_pretrained``) ->
   :func:`bitnet.hf.bitllama_convert.bitllama_to_transformer` (training form, then packed);
4. any other existing file or folder -> :func:`bitnet.io.load_model` (our run folders,
   ``.safetensors``, state-dict ``.pth``), which names what is wrong with it;
5. a name of the form ``org/name`` that is no local path -> a Hugging Face Hub id, resolved through
   ``huggingface_hub``'s cache (``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` never touches the network),
   then 2-4 on the snapshot folder.

Layering: this module sits with ``generate`` / ``hf`` (it imports io, convert and models, and hf,
gguf import and huggingface_hub lazily, only for the formats that need them).

Memory: in the packed inference form of a Hugging Face checkpoint that stores its embedding table in
bf16/fp16 (the official ones), the table is a copy-on-write memory map of the file (:func:`map_embedding`:
exact, and only looked-up rows ever become resident); the model casts the looked-up rows to its compute
dtype (fp32), so everything after the lookup is unchanged. An fp32 table whose values are bf16 values
(``bitnet pack`` of an official checkpoint) is stored in bf16 (:func:`bf16_embedding_if_exact`); other
tables stay as they are read (fp32 for our own checkpoints). A mapped 2B4T-shaped table costs a few
pages per token instead of 1313 MB.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .io import CheckpointError, STATE_DICT_SUFFIXES, read_json_object, recover_checkpoint
from .tokenizer import HFTokenizer

ACCEPTED_FORMATS = (
    "a bitnet run folder (config.json + model.safetensors), a .safetensors file or a state-dict "
    f"{'/'.join(STATE_DICT_SUFFIXES)} file",
    "a Hugging Face folder in the official BitNet layout (config.json with model_type 'bitnet': packed uint8 "
    "or bf16 weights, model.safetensors or shards with model.safetensors.index.json)",
    "a BitLlama folder written by BitLlamaForCausalLM.save_pretrained (model_type 'bitllama')",
    "a Hugging Face Hub id such as microsoft/bitnet-b1.58-2B-4T (from the huggingface_hub cache)",
    "a .gguf file of arch 'bitnet' (TQ1_0 / TQ2_0)",
)
"""What :func:`load` accepts, in the words of its error messages."""

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.gguf"]
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|eom_id|>")
"""End-of-turn tokens recognised in chat templates: a template that writes one after every turn makes
the model end its answer with it, so it joins the stop ids."""
SAFETENSORS_16BIT = {"BF16": torch.bfloat16, "F16": torch.float16}
GENERATION_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


class ModelFormatError(CheckpointError):
    """MODEL is none of the accepted formats (or a Hub id that cannot be resolved here)."""


@dataclass
class LoadedModel:
    """What :func:`load` returns.

    Attributes:
        model: the :class:`~bitnet.models.BitNetTransformer`, in eval mode on ``device``.
        tokenizer: ``encode``/``decode``/``vocab_size``/``stream_decoder`` object (:class:`ByteTokenizer`
            for our byte-level runs, :class:`PretrainedTokenizer` for Hugging Face folders), or None when
            the checkpoint ships none (a GGUF without vocabulary, an HF folder without tokenizer.json).
        generation: sampling defaults from ``generation_config.json`` (keys among ``temperature``,
            ``top_k``, ``top_p``, ``repetition_penalty``, ``max_new_tokens``; greedy files give
            ``temperature=0``); empty when the checkpoint has none.
        chat_template: the tokenizer's Jinja chat template, or None (plain "User:/Assistant:" turns).
        stop_ids: token ids that end a generation (eos ids of the configs and tokenizer, and the
            end-of-turn tokens the chat template writes).
        context_length: the longest sequence the model takes (its ``max_seq_len``).
        name: a short display name (folder or file stem, or the Hub id).
        kind: ``"bitnet"``, ``"hf-bitnet"``, ``"bitllama"`` or ``"gguf"``.
        path: the local file or folder read (the snapshot folder for a Hub id).
        packed: whether the model is in the packed inference form.
        device: where the model is.
    """

    model: nn.Module
    tokenizer: object | None
    generation: dict = field(default_factory=dict)
    chat_template: str | None = None
    stop_ids: tuple[int, ...] = ()
    context_length: int = 0
    name: str = "model"
    kind: str = "bitnet"
    path: Path | None = None
    packed: bool = False
    device: torch.device = torch.device("cpu")

    def require_tokenizer(self):
        """The tokenizer; ValueError naming the checkpoint when it has none."""
        if self.tokenizer is None:
            raise ValueError(f"{self.path or self.name} ships no tokenizer (for a Hugging Face folder: "
                             "tokenizer.json and tokenizer_config.json beside config.json)")
        return self.tokenizer


# --------------------------------------------------------------------------------------------- device

def check_device(device) -> torch.device:
    """``resolve_device`` plus a one-line error when the device's backend is not available here."""
    from .io import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {str(device)!r} is not available: {why} (torch {torch.__version__}); "
                         "use --device cpu")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {str(device)!r} is not available on this machine; use --device cpu")
    return dev


# --------------------------------------------------------------------------------------------- format detection

def detect_format(path: Path) -> str:
    """``"gguf"``, ``"hf-bitnet"``, ``"bitllama"`` or ``"bitnet"`` for an existing ``path``; else
    :class:`ModelFormatError` naming the path and the accepted formats."""
    return _detect(path)[0]


def _detect(path: Path) -> tuple[str, dict | None]:
    """(:func:`detect_format`, the folder's config.json as read for it, or None): the one read of that file
    in a load. A bitnet run folder's interrupted save is completed first, so the file read is the new one."""
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", None
        if path.suffix == ".safetensors" or path.suffix in STATE_DICT_SUFFIXES:
            return "bitnet", None
        raise ModelFormatError(unknown_format_message(path, f"{path.suffix or 'no suffix'!s} is not a model file"))
    recover_checkpoint(path)                                # no-op unless a bitnet save was interrupted
    config = path / "config.json"
    if config.is_file():
        cfg = read_json_object(config)
        if cfg.get("format") == "bitnet":
            return "bitnet", cfg
        model_type = cfg.get("model_type")
        if model_type == "bitnet" or "BitNetForCausalLM" in (cfg.get("architectures") or ()):
            return "hf-bitnet", cfg
        if model_type == "bitllama":
            return "bitllama", cfg
        raise ModelFormatError(unknown_format_message(
            path, f"its config.json has model_type {model_type!r} (not 'bitnet' or 'bitllama')"))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1 and not any(path.glob("*.safetensors")):
        return "gguf", None
    if any(p.suffix == ".safetensors" or p.suffix in STATE_DICT_SUFFIXES for p in path.iterdir()):
        return "bitnet", None                               # bitnet.io names what is missing
    raise ModelFormatError(unknown_format_message(path, "the folder holds no config.json, weights or .gguf file"))


def unknown_format_message(path, why: str) -> str:
    return f"cannot load {path}: {why}. MODEL may be " + "; ".join(ACCEPTED_FORMATS)


# --------------------------------------------------------------------------------------------- hub

def hub_cache_dir() -> str | None:
    """``HF_HUB_CACHE`` (else ``HF_HOME/hub``) as set now; None leaves huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set to a true value (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub_id(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """The local snapshot folder of Hub repo ``repo_id``: from the huggingface_hub cache
    (``<cache>/models--org--name/snapshots/<rev>``, ``refs/<revision>``), else downloaded unless
    ``HF_HUB_OFFLINE`` is set. ModelFormatError naming the id and HF_HUB_OFFLINE when neither works."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelFormatError(f"{repo_id!r} is no local file or folder, and resolving it as a Hugging Face Hub "
                               "id needs huggingface_hub: pip install \".[hf]\" (from a clone)") from None
    cache_dir = cache_dir or hub_cache_dir()
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_FILES)
    try:
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except Exception as cached_err:   # noqa: BLE001 -- not in the cache: download, or say why not
        where = cache_dir or "huggingface_hub's default cache"
        if hub_offline():
            raise ModelFormatError(
                f"{repo_id!r} is not a local path and not in the Hugging Face cache ({where}), and HF_HUB_OFFLINE "
                "is set, so it cannot be downloaded: download it where the Hub is reachable (or unset "
                "HF_HUB_OFFLINE) and pass its folder or set HF_HUB_CACHE") from cached_err
        try:
            return Path(snapshot_download(**kwargs))
        except Exception as err:   # noqa: BLE001
            raise ModelFormatError(
                f"cannot download {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}) and it is not "
                f"in the cache ({where}); pass a local folder, or set HF_HUB_CACHE to a cache that holds it "
                "(HF_HUB_OFFLINE=1 skips the network)") from err


# --------------------------------------------------------------------------------------------- tokenizer

def _token_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return [int(value)] if isinstance(value, int) and not isinstance(value, bool) else []


class PretrainedTokenizer(HFTokenizer):
    """An :class:`~bitnet.tokenizer.HFTokenizer` read from a checkpoint folder, with its chat template and
    stop ids. ``encode`` adds no special tokens (chat templates write them); ``encode_prompt`` adds what
    the tokenizer adds to a plain prompt (Llama 3: ``<|begin_of_text|>``)."""

    kind = "hf"
    stop_ids: tuple[int, ...] = ()

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a plain-text prompt, with the special tokens the tokenizer adds (BOS)."""
        return list(self.hf.encode(text, add_special_tokens=True))

    def to_config(self) -> dict:
        """``{"type": "hf", "name": absolute folder}`` (``bitnet pack`` also copies the files beside the weights)."""
        name = self.name
        if name and Path(name).exists():
            name = str(Path(name).resolve())
        return {"type": self.kind, "name": name}

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.hf, "chat_template", None)
        return template if isinstance(template, str) else None


def load_hf_tokenizer(folder: Path):
    """:class:`PretrainedTokenizer` of a folder with ``tokenizer.json`` (and ``tokenizer_config.json``),
    or None when the folder ships no tokenizer."""
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(f"the tokenizer of {folder} needs transformers: pip install \".[hf]\" (from a clone)") from None
    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:   # noqa: BLE001 -- transformers raises many kinds for broken files
        raise CheckpointError(f"cannot read the tokenizer in {folder}: {type(e).__name__}: {e}") from e
    return PretrainedTokenizer(hf)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end an answer: the tokenizer's ``stop_ids`` (set by :func:`bitnet.load`: eos ids and
    the chat template's end-of-turn token) when it has them, else its ``eos_id``, else none."""
    ids = getattr(tokenizer, "stop_ids", None)
    if ids:
        return tuple(int(i) for i in ids)
    eos = getattr(tokenizer, "eos_id", None)
    return () if eos is None else (int(eos),)


def stop_ids_for(tokenizer, *configs: dict) -> tuple[int, ...]:
    """eos ids of ``configs`` (config.json, generation_config.json) and of the tokenizer, plus the
    end-of-turn tokens (:data:`END_OF_TURN_TOKENS`) that the tokenizer's chat template writes."""
    ids: list[int] = []
    for cfg in configs:
        ids += _token_ids(cfg.get("eos_token_id"))
    eos = getattr(tokenizer, "eos_id", None)
    ids += _token_ids(eos)
    template = getattr(tokenizer, "chat_template", None)
    hf = getattr(tokenizer, "hf", None)
    if isinstance(template, str) and hf is not None:
        vocab = hf.get_vocab()
        ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in template and t in vocab]
    return tuple(dict.fromkeys(ids))


def generation_defaults(folder: Path | None) -> tuple[dict, dict]:
    """(sampling defaults, raw generation_config.json) of a checkpoint folder; empty when none."""
    if folder is None or not (folder / "generation_config.json").is_file():
        return {}, {}
    raw = read_json_object(folder / "generation_config.json")
    out = {k: raw[k] for k in GENERATION_KEYS if raw.get(k) is not None}
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
    if "top_k" in out and int(out["top_k"]) <= 0:
        del out["top_k"]
    return out, raw


# --------------------------------------------------------------------------------------------- memory

def mapped_tensor(folder: Path, key: str) -> torch.Tensor | None:
    """Tensor ``key`` of the safetensors checkpoint in ``folder`` as a copy-on-write memory map of its file
    (no bytes read until used), or None when it is not stored in 16 bits as one plain array."""
    index = folder / "model.safetensors.index.json"
    try:
        fname = read_json_object(index)["weight_map"][key] if index.is_file() else "model.safetensors"
    except (KeyError, TypeError):
        return None
    path = folder / fname
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n)).get(key)
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_16BIT:
            return None
        begin, end = entry["data_offsets"]
        dtype, shape = SAFETENSORS_16BIT[entry["dtype"]], entry["shape"]
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * 2:
            return None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin).view(*shape)


def map_embedding(model: nn.Module, table: torch.Tensor) -> bool:
    """Use ``table`` (a 16-bit memory map of the checkpoint's embedding, :func:`mapped_tensor`) as
    ``model.embed``'s weight when it holds exactly the same values; True when it did.

    Only the rows that are looked up are ever read from the file (a few pages per token), so the 656 MB
    table of a 2B4T-shaped model costs no resident memory up front. The file must stay in place while the
    model lives (mapped copy-on-write: the model never writes to it)."""
    embed = getattr(model, "embed", None)
    if not isinstance(embed, nn.Embedding) or tuple(embed.weight.shape) != tuple(table.shape):
        return False
    if isinstance(getattr(model, "head", None), nn.Linear):
        return False                              # an fp head tied to the table would read all of it per token
    probe = slice(0, min(64, table.shape[0]))
    if not torch.equal(embed.weight[probe].to(table.dtype), table[probe]):
        return False
    embed.weight = nn.Parameter(table, requires_grad=False)
    return True


def bf16_embedding_if_exact(model: nn.Module) -> bool:
    """Store ``model.embed`` in bf16 when that loses nothing (an fp32 table of bf16 values, e.g. a run folder
    that ``bitnet pack`` wrote from an official checkpoint: 656 MB instead of 1313 MB for 2B4T); True when
    it did. Only for the packed form (the int8 head no longer reads the table)."""
    embed = getattr(model, "embed", None)
    if not isinstance(embed, nn.Embedding) or embed.weight.dtype != torch.float32:
        return False
    if isinstance(getattr(model, "head", None), nn.Linear):
        return False
    w = embed.weight.detach()
    as_bf16 = w.to(torch.bfloat16)
    if not torch.equal(as_bf16.float(), w):
        return False
    embed.weight = nn.Parameter(as_bf16, requires_grad=False)
    return True


# --------------------------------------------------------------------------------------------- loaders

def _load_bitnet(path: Path, pack: bool, run_config: dict | None = None,
                 **overrides) -> tuple[nn.Module, object, Path | None]:
    """Model, tokenizer and folder of one of our checkpoints; ``run_config``: its config.json as
    :func:`_detect` read it (checked here, not read again)."""
    from .io import load_checkpoint
    from .io.config import check_config
    from .tokenizer import ByteTokenizer, tokenizer_from_config

    folder = path if path.is_dir() else path.parent
    if run_config is not None:
        run_config = check_config(run_config, folder / "config.json")
    model, saved = load_checkpoint(path, run_config=run_config, **overrides)
    tok_cfg = None if saved is None else saved.get("tokenizer")
    if isinstance(tok_cfg, dict) and tok_cfg.get("type") == "hf" and (folder / "tokenizer.json").is_file():
        tokenizer = load_hf_tokenizer(folder)          # the files `bitnet pack` copies beside the weights
    else:
        tokenizer = tokenizer_from_config(tok_cfg, source=folder / "config.json") if tok_cfg else ByteTokenizer()
    if pack:
        from .storage import is_packed, pack as pack_model

        if not is_packed(model):
            pack_model(model)
    return model, tokenizer, folder


def _load_hf_bitnet(folder: Path) -> nn.Module:
    from .hf import BitNetForCausalLM, to_bitnet_transformer

    hf_model = BitNetForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    model = to_bitnet_transformer(hf_model, head="fp")
    del hf_model
    model.head = int8_head(model.head)      # as pack(head="int8") does, in row blocks: no fp32 temporaries
    return model


@torch.no_grad()
def int8_head(linear: nn.Linear, rows: int = 8192) -> nn.Module:
    """``Int8Linear.from_linear(linear)`` computed ``rows`` output rows at a time (per-row absmax: the same
    values), so a 128256-row head never needs whole-table float temporaries while loading."""
    from .nn.int8_linear import Int8Linear
    from .ops.int8 import quantize_weight_int8

    w = linear.weight
    head = Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    parts = [quantize_weight_int8(w[i:i + rows]) for i in range(0, w.shape[0], rows)]
    head.w_int8 = torch.cat([q for q, _ in parts])
    head.w_scale = torch.cat([sc for _, sc in parts])
    if linear.bias is not None:
        head.bias = linear.bias.detach().float().clone()
    return head


def _load_bitllama(folder: Path, pack: bool, config: dict) -> nn.Module:
    from .hf.bitllama_convert import bitllama_to_transformer

    model = bitllama_to_transformer(folder, config)
    if pack:
        from .storage import pack as pack_model

        pack_model(model)
    return model


def _load_gguf(path: Path):
    from .convert.gguf_import import load_gguf

    try:
        return load_gguf(str(path))
    except ImportError as e:             # the gguf package (the hf extra) is not installed
        raise ModelFormatError(f"cannot load {path}: {e}") from None


def load(model, *, device=None, pack: bool | None = None, compact_embeddings: bool = True,
         revision: str | None = None, cache_dir: str | None = None, **overrides) -> LoadedModel:
    """Load ``model`` (any of :data:`ACCEPTED_FORMATS`) as a ready-to-run :class:`LoadedModel`.

    Args:
        model: a path (file or folder) or a Hugging Face Hub id.
        device: ``None``/``"auto"`` (cuda, then mps, then cpu), ``"cpu"``, ``"cuda"``, ... A device whose
            backend this torch lacks is a ValueError (one line), not a traceback.
        pack: convert BitLinear layers to the packed 2-bit form (int8 head). ``None`` (default): pack on
            the CPU, keep fp weights elsewhere. Official BitNet and GGUF checkpoints are ternary already
            and always load packed.
        compact_embeddings: in the packed form, use a 16-bit embedding table of a Hugging Face checkpoint
            as a memory map of its file (:func:`map_embedding`), and store fp32 tables of bf16 values in
            bf16 (:func:`bf16_embedding_if_exact`); both exact. False keeps the fp32 copy.
        revision, cache_dir: for Hub ids (default: ``refs/main``; ``HF_HUB_CACHE``).
        **overrides: constructor kwargs for our own checkpoints (``heads=``, ``max_seq_len=``, ...),
            as :func:`bitnet.io.load_model` takes them.

    Raises FileNotFoundError / :class:`ModelFormatError` (both name ``model`` and, for unknown formats,
    list the accepted ones) and :class:`~bitnet.io.CheckpointError` for damaged checkpoints.
    """
    dev = check_device(device)
    pack = dev.type == "cpu" if pack is None else bool(pack)
    text = os.fspath(model)
    path = Path(text).expanduser()
    name = path.stem if path.is_file() else path.resolve().name
    if not path.exists():
        if text.startswith((".", "/", "~")) or not HUB_ID.match(text):
            raise FileNotFoundError(unknown_format_message(path, "no such file or folder"))
        path, name = resolve_hub_id(text, revision=revision, cache_dir=cache_dir), text
    kind, config_json = _detect(path)
    if overrides and kind != "bitnet":
        raise ValueError(f"{sorted(overrides)} apply to bitnet checkpoints only, not to {kind} checkpoints ({path})")
    folder = path if path.is_dir() else path.parent
    config: dict = {}
    if kind == "bitnet":
        net, tokenizer, folder = _load_bitnet(path, pack, config_json, **overrides)
    elif kind == "gguf":
        gguf_path = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
        net, tokenizer = _load_gguf(gguf_path)
        if tokenizer is not None and not hasattr(tokenizer, "encode"):
            tokenizer = HFTokenizer(tokenizer)
    else:
        config = config_json if config_json is not None else read_json_object(folder / "config.json")
        tokenizer = load_hf_tokenizer(folder)
        if kind == "hf-bitnet":
            net = _load_hf_bitnet(folder)
        else:
            net = _load_bitllama(folder, pack, config)
    from .storage import is_packed

    packed = is_packed(net)
    if packed and compact_embeddings:
        mapped = mapped_tensor(folder, "model.embed_tokens.weight") if kind in ("hf-bitnet", "bitllama") else None
        if mapped is None or not map_embedding(net, mapped):
            bf16_embedding_if_exact(net)
    net = net.to(dev).eval()
    generation, gen_raw = generation_defaults(folder if kind != "bitnet" or path.is_dir() else None)
    if tokenizer is not None and hasattr(tokenizer, "hf"):
        tokenizer.stop_ids = stop_ids_for(tokenizer, config, gen_raw)
    stop_ids = tuple(getattr(tokenizer, "stop_ids", ()) or _token_ids(getattr(tokenizer, "eos_id", None)))
    return LoadedModel(model=net, tokenizer=tokenizer, generation=generation,
                       chat_template=getattr(tokenizer, "chat_template", None), stop_ids=stop_ids,
                       context_length=int(getattr(net, "max_seq_len", 0)), name=name, kind=kind,
                       path=path, packed=packed, device=dev)


__all__ = ["ACCEPTED_FORMATS", "END_OF_TURN_TOKENS", "LoadedModel", "ModelFormatError", "PretrainedTokenizer", "check_device",
           "bf16_embedding_if_exact", "detect_format", "map_embedding", "mapped_tensor", "generation_defaults", "load", "load_hf_tokenizer",
           "resolve_hub_id", "stop_ids_for", "stop_token_ids"]
