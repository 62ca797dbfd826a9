"""lm-evaluation-harness adapter: run lm-eval tasks on a bitnet model.

    import lm_eval
    from bitnet.lm_eval_adapter import BitNetLM
    lm = BitNetLM("runs/kjv")                              # or BitNetLM(model=m, tokenizer=tok)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

Importing this module registers the model name ``"bitnet"`` with lm-eval
(``--model bitnet --model_args path=runs/kjv,batch_size=8`` once the module is imported, e.g. from
a Python driver). Needs ``pip install lm-eval``.

- ``loglikelihood``: log P(continuation | context) summed over the continuation's tokens, and whether
  greedy decoding would produce exactly those tokens. An empty context is replaced by the prefix token.
- ``loglikelihood_rolling``: log-likelihood of a whole document given the prefix token, with
  disjoint windows of the full context (each token predicted once; the last window full-length).
- ``generate_until``: greedy (or sampled, if ``do_sample``) generation until one of ``until`` or
  ``max_gen_toks``; all requests are decoded together by the continuous-batching :class:`~bitnet.serve.Engine`.

The prefix token is the tokenizer's ``eos_id`` when it has one, else the id of ``"\\n"``.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .evaluate import token_nll


@register_model("bitnet")
class BitNetLM(LM):
    """An lm-eval ``LM`` around a BitNetTransformer.

    Args:
        path: checkpoint to load (run folder, .safetensors or .pth); or pass ``model`` and ``tokenizer``.
        batch_size: sequences per forward pass (and generation slots).
        max_length: context in tokens (default: the model's ``max_seq_len``).
        max_gen_toks: default generation budget of ``generate_until``.
        device, pack: as for :class:`bitnet.generate.BitNetInference`.
    """

    def __init__(self, path=None, model=None, tokenizer=None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, device=None, pack: bool | str = False):
        super().__init__()
        if (path is None) == (model is None):
            raise ValueError("pass either path= (a checkpoint) or model= (with tokenizer=), not both")
        from .generate import BitNetInference

        pack = pack in (True, "true", "True", "1")
        inf = BitNetInference(model=model, tokenizer=tokenizer, device=device, pack=pack) if model is not None \
            else BitNetInference(device=device, pack=pack).load_model(path)
        self.model, self.tokenizer = inf.model, inf.tokenizer
        self._device = inf.device
        self.batch_size = int(batch_size)
        self.max_length = min(int(max_length or self.model.max_seq_len), self.model.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        if self.batch_size < 1 or self.max_length < 2 or self.max_gen_toks < 1:
            raise ValueError("batch_size and max_gen_toks must be >= 1 and max_length >= 2")
        eos = getattr(self.tokenizer, "eos_id", None)
        self.prefix_token_id = eos if eos is not None else self.tokenizer.encode("\n")[0]

    # ------------------------------------------------------------------ loglikelihood

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # trailing spaces of the context belong to the continuation (lm-eval's convention)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx = self.tokenizer.encode(context) if context else [self.prefix_token_id]
        cont = self.tokenizer.encode(continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        return ctx, cont

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(cont | ctx), greedy) for token pairs, batched by length (longest first)."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        seqs = []
        for i, (ctx, cont) in enumerate(pairs):
            full = (ctx + cont)[-(self.max_length + 1):]                 # keep the end: the continuation
            seqs.append((i, full[:-1], min(len(cont), len(full) - 1)))
        seqs.sort(key=lambda s: -len(s[1]))
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            width = len(chunk[0][1])
            x = torch.zeros(len(chunk), width, dtype=torch.int64)           # (B, L), right-padded
            for row, (_, inp, _) in enumerate(chunk):
                x[row, :len(inp)] = torch.tensor(inp)
            logp = F.log_softmax(self.model(x.to(self._device)).float(), dim=-1).cpu()   # (B, L, V)
            for row, (i, inp, n_cont) in enumerate(chunk):
                ctx, cont = pairs[i]
                pos = torch.arange(len(inp) - n_cont, len(inp))             # positions predicting cont
                target = torch.tensor(cont[len(cont) - n_cont:])
                lp = logp[row, pos]                                          # (n_cont, V)
                results[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        out = self._score(pairs)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            ids = [self.prefix_token_id] + self.tokenizer.encode(text)
            if len(ids) < 2:
                out.append(0.0)
                continue
            nll = token_nll(self.model, ids, self.max_length, self.max_length, self.batch_size)
            out.append(-float(nll.sum()))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .serve.engine import Engine, Request, SamplingParams

        jobs = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            ids = self.tokenizer.encode(context) or [self.prefix_token_id]
            max_gen = max(1, min(max_gen, self.max_length - 1))
            ids = ids[-(self.max_length - max_gen):]                         # room for the answer
            eos = getattr(self.tokenizer, "eos_id", None)
            params = SamplingParams(max_tokens=max_gen, temperature=temperature, top_p=kw.pop("top_p", None),
                                    top_k=kw.pop("top_k", None), seed=kw.pop("seed", None),
                                    stop=[s for s in until if s], stop_token_ids=() if eos is None else (eos,))
            jobs.append((ids, params))
        results: list[str | None] = [None] * len(jobs)
        done = threading.Semaphore(0)
        errors: list[str] = []
        with Engine(self.model, self.tokenizer, slots=min(self.batch_size, max(1, len(jobs))),
                    max_queue=len(jobs), context=self.max_length) as engine:
            reqs = []
            for i, (ids, params) in enumerate(jobs):
                def emit(ev, i=i):
                    if ev[0] == "error":
                        errors.append(ev[1])
                    if ev[0] in ("done", "error"):
                        done.release()
                reqs.append(engine.submit(Request(ids, params, emit)))
            for _ in jobs:
                done.acquire()
        if errors:
            raise RuntimeError(f"generation failed: {errors[0]}")
        for i, (req, r) in enumerate(zip(requests, reqs)):
            results[i] = r.text
            self.cache_hook.add_partial("generate_until", req.args, r.text)
        return results
