"""Continuous batching: one background thread decodes every active request together.

The engine owns a fixed number of *slots*, the rows of one :class:`bitnet.generate.Decoder`
(``Decoder(model, rows=slots, max_len=context)``). A new request waits in a bounded queue until a
slot is free; the prompts admitted at one turn of the loop are prefilled together, grouped by length
(:func:`prefill_groups`, ``decoder.prefill_rows``: one forward per group reads the weights once).
Every step then runs ONE forward over the busy rows (``decoder.step(tokens, rows)``: one new token
per row at per-row positions), and each row samples its next token with its own settings and its
own ``torch.Generator``. A finished or cancelled request frees its slot at the start of the next step.

Results leave the engine through each request's ``emit`` callback (called from the engine thread):
``("text", piece)`` for every piece of complete text, then exactly one ``("done", finish_reason)``
(finish_reason ``"stop"`` or ``"length"``) or ``("error", message)``.

Failures stay with the request that caused them: an exception while admitting a request (e.g. its
generator), prefilling it, or sampling / decoding its token ends that request alone with an
``("error", ...)`` event; a failing batched forward ends the requests of that step. The loop itself
keeps running; :meth:`Engine.health` says whether it is alive and making progress (``/health``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..generate.decoder import Decoder
from ..generate.sampling import check_sampling_args, sample_next_token


log = logging.getLogger("bitnet.serve")

# what torch.Generator.manual_seed accepts (it raises RuntimeError outside this range)
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; try again later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine's decode thread is not running (stopped or crashed): nothing submitted would be served."""


@dataclass
class SamplingParams:
    """Per-request decoding settings (validated by :meth:`check`)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()              # stop strings (not included in the output)
    stop_token_ids: Sequence[int] = ()    # stop tokens (not included in the output)

    def check(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.repetition_penalty)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(f"seed must be None or an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")


@dataclass(eq=False)
class Request:
    """One generation: prompt token ids, settings, and the callback that receives its events."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[tuple], None]
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    # filled in by the engine
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    slot: int | None = None

    def cancel(self) -> None:
        """Stop generating (client went away); the slot is freed at the start of the next step."""
        self.cancelled = True


class _Active:
    """Engine-side state of a request that holds a slot."""

    def __init__(self, req: Request, tokenizer, device):
        self.req = req
        self.last = None                                 # last sampled token (fed at the next step)
        p = req.params
        self.generator = None
        if p.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(p.seed) if p.seed is not None else
                                       int(torch.randint(0, 2**62, (1,)).item()))
        self.history = list(req.prompt_ids)              # for the repetition penalty
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.pending = ""                                # text held back: may be the start of a stop string
        self.ended = False                               # its last event ("done" or "error") was emitted
        self.stops = set(int(t) for t in p.stop_token_ids)
        self.greedy = p.temperature == 0 and p.repetition_penalty == 1.0


def _hold_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def prefill_groups(lengths: Sequence[int], max_tokens: int = 4096, max_padding: float = 0.25) -> list[list[int]]:
    """Split prompts of ``lengths`` into groups prefilled together (indices into ``lengths``).

    A group's prompts are right-padded to its longest, so prompts of similar lengths go together:
    sorted by length, a group grows while its padded size (members x longest) stays within
    ``max_tokens`` and its padding within ``max_padding`` of the padded size (a group of one is always
    allowed).
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        g = groups[-1] if groups else None
        if g is not None:
            n, longest = len(g) + 1, lengths[i]                      # sorted: the newcomer is the longest
            real = sum(lengths[j] for j in g) + lengths[i]
            if n * longest <= max_tokens and n * longest - real <= max_padding * n * longest:
                g.append(i)
                continue
        groups.append([i])
    return groups


class Engine:
    """Continuous-batching generator around a BitNetTransformer-like model.

    Args:
        model: has ``new_caches(batch, max_len)``, ``max_seq_len`` and
            ``forward(tokens, caches, start_pos)`` accepting per-row LongTensor positions.
        tokenizer: ``encode``/``decode``/``stream_decoder`` (e.g. :class:`bitnet.tokenizer.ByteTokenizer`).
        slots: sequences decoded together (rows of the batch KV cache).
        max_queue: requests that may wait for a slot; more raise :class:`QueueFullError`.
        context: tokens per sequence, prompt + output (default and maximum: ``model.max_seq_len``).
        kv_dtype: what the KV caches store (see :class:`bitnet.generate.Decoder`): None (the model's dtype),
            ``"float32"``, ``"float16"`` (half the cache bytes per step) or ``"int8"`` (a quarter, with one
            float32 scale per key/value vector); rounded when written.
        stall_timeout: seconds without progress, while requests wait or run, after which
            :meth:`health` reports the engine as stuck (default 120: a long prefill of a big model on a
            slow CPU must not count as stuck).
    """

    # unexplained failures of the loop itself (not of one request) in a row before the engine gives up
    MAX_LOOP_FAILURES = 3

    def __init__(self, model: nn.Module, tokenizer, slots: int = 8, max_queue: int = 64,
                 context: int | None = None, stall_timeout: float = 120.0, kv_dtype=None):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        max_seq_len = int(model.max_seq_len)
        context = max_seq_len if context is None else context
        if isinstance(context, bool) or not isinstance(context, int) or not 2 <= context <= max_seq_len:
            raise ValueError(f"context must be an integer in [2, {max_seq_len}] (the model's max_seq_len), got {context!r}")
        if isinstance(stall_timeout, bool) or not isinstance(stall_timeout, (int, float)) or not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be a number of seconds > 0, got {stall_timeout!r}")
        self.stall_timeout = float(stall_timeout)
        self.model = model.eval()
        self.tokenizer = tokenizer
        outputs, known = getattr(model, "num_tokens", None), getattr(tokenizer, "vocab_size", None)
        if isinstance(outputs, int) and isinstance(known, int) and outputs > known:
            log.warning("the model outputs %d token ids but its tokenizer knows %d: a request that samples an id "
                        ">= %d cannot be decoded (with the byte tokenizer it ends with an error)", outputs, known, known)
        self.slots, self.max_queue, self.context = slots, max_queue, context
        # the caches, prefill/step, threads
        self.decoder = Decoder(self.model, rows=slots, max_len=context, kv_dtype=kv_dtype)
        self.device = self.decoder.device
        self.kv_dtype = str(self.decoder.caches[0].k.dtype).removeprefix("torch.")   # what the caches store
        self._active: list[_Active | None] = [None] * slots
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0                                   # decode steps run (for tests and /health)
        self.prefills = 0                                # prefill forwards run (one per group of prompts)
        self.max_batch_seen = 0                          # most rows decoded together
        self.decoded_rows = 0                            # tokens decoded by the steps (rows summed over steps)
        self.finished = 0                                # requests that ended normally
        self.cancelled = 0                               # requests cancelled while waiting or in a slot
        self.failed = 0                                  # requests ended by an error inside the engine
        self.failure: str | None = None                  # why the loop died, if it did
        self._beat = time.monotonic()                    # last sign of progress of the loop

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> "Engine":
        """Start the decode thread (again, after :meth:`stop` or a crash)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self.failure = None
            self._beat = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="bitnet-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the decode loop; waiting and active requests get an ``("error", ...)`` event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, req: Request) -> Request:
        """Queue ``req``. Raises ValueError for bad settings or a prompt that does not fit the context,
        :class:`QueueFullError` when ``max_queue`` requests are already waiting."""
        req.params.check()
        if not req.prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if len(req.prompt_ids) >= self.context:
            raise ValueError(f"prompt has {len(req.prompt_ids)} tokens; the context holds {self.context} "
                             "(prompt + at least one generated token)")
        with self._cond:
            if self.dead:
                raise EngineDeadError("the engine is not running" + (f" (it died: {self.failure})"
                                                                      if self.failure else " (stopped)"))
            free = sum(a is None for a in self._active)
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFullError(f"server busy: {len(self._waiting)} requests are waiting "
                                     f"(max_queue={self.max_queue}); retry later")
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def stats(self) -> dict:
        # read without the lock: a stuck engine must not hang /health (each read is atomic under the GIL)
        return {"slots": self.slots, "active": sum(a is not None for a in list(self._active)),
                "waiting": len(self._waiting), "max_queue": self.max_queue, "context": self.context,
                "steps": self.steps, "prefills": self.prefills, "decoded_rows": self.decoded_rows,
                "max_batch_seen": self.max_batch_seen, "finished": self.finished, "cancelled": self.cancelled,
                "failed": self.failed, "kv_dtype": self.kv_dtype}

    @property
    def dead(self) -> bool:
        """True once the decode thread was started and has stopped, died, or been asked to stop (a never
        started engine is not dead: what it is given waits for :meth:`start`)."""
        t = self._thread
        return t is not None and (self._stopping or not t.is_alive())

    def health(self) -> tuple[bool, str | None]:
        """(ok, reason): not ok when the loop is not running (never started, stopped, died) or when
        requests are waiting or running and the loop made no progress for ``stall_timeout`` seconds."""
        if self._thread is None:
            return False, "engine not started"
        if not self._thread.is_alive():
            return False, f"engine thread died: {self.failure}" if self.failure else "engine stopped"
        if self._stopping:
            return False, "engine is stopping"
        idle = time.monotonic() - self._beat
        busy = bool(self._waiting) or any(a is not None for a in list(self._active))
        if busy and idle > self.stall_timeout:
            return False, (f"engine stuck: no progress for {idle:.0f} s with requests waiting or running "
                           f"(stall_timeout {self.stall_timeout:g} s)")
        return True, None

    # ------------------------------------------------------------------ engine thread

    def _free_slot(self) -> int | None:
        for i, a in enumerate(self._active):
            if a is None:
                return i
        return None

    def _run(self) -> None:
        failures = 0
        try:
            with torch.inference_mode():
                while True:
                    try:
                        if not self._step():
                            break
                        failures = 0
                    except Exception as e:  # a bug outside the per-request guards: end the requests in slots
                        failures += 1
                        log.exception("engine loop failed (%d in a row)", failures)
                        with self._cond:
                            for a in [a for a in self._active if a is not None]:
                                self._fail(a, e)
                        if failures >= self.MAX_LOOP_FAILURES:
                            self.failure = f"{failures} loop failures in a row, the last {type(e).__name__}: {e}"
                            break
        except BaseException as e:
            self.failure = f"{type(e).__name__}: {e}"
            raise
        finally:
            why = "server is shutting down" if self.failure is None else f"engine died: {self.failure}"
            with self._cond:
                for a in [a for a in self._active if a is not None]:
                    self._finish(a, None, error=why)
                while self._waiting:
                    self._end_waiting(self._waiting.popleft(), why)

    def _step(self) -> bool:
        """One turn of the loop: admit waiting requests (prefill), then one decode step. False to stop."""
        with self._cond:
            while not self._stopping and not self._waiting and all(a is None for a in self._active):
                self._cond.wait()
            if self._stopping:
                return False
            self._beat = time.monotonic()
            self._release_cancelled()
            admitted = self._admit()
        for group in prefill_groups([len(a.req.prompt_ids) for a in admitted]):
            # in slot order: a group of adjacent slots is prefilled in place (Decoder.prefill_rows)
            self._guard(self._prefill, sorted((admitted[i] for i in group), key=lambda a: a.req.slot))
            self._beat = time.monotonic()
        if any(a is not None and a.last is not None for a in self._active):
            self._guard(self._decode, [a for a in self._active if a is not None])
        self._beat = time.monotonic()
        return True

    def _admit(self) -> list[_Active]:
        """Move waiting requests into free slots (lock held). A request whose engine-side state cannot be
        built (e.g. a seed its generator refuses) ends alone with an error."""
        admitted = []
        while self._waiting and (slot := self._free_slot()) is not None:
            req = self._waiting.popleft()
            if req.cancelled:
                self.cancelled += 1
                continue
            try:
                a = _Active(req, self.tokenizer, self.device)
            except Exception as e:
                log.exception("request %d could not be admitted", req.id)
                self.failed += 1
                self._end_waiting(req, f"{type(e).__name__}: {e}")
                continue
            req.slot = slot
            self._active[slot] = a
            admitted.append(a)
        return admitted

    def _end_waiting(self, req: Request, message: str) -> None:
        """Error event for a request that never got a slot."""
        try:
            req.emit(("error", message))
        except Exception:
            log.exception("emit of request %d failed", req.id)

    def _guard(self, fn, group: list[_Active]) -> None:
        try:
            fn(group)
        except Exception as e:  # a model error ends the requests involved, never the loop
            log.exception("%s failed for %d request(s)", fn.__name__.strip("_"), len(group))
            with self._cond:
                for a in group:
                    self._fail(a, e)

    def _fail(self, a: _Active, e: Exception) -> None:
        """End ``a`` with an error event unless it already ended (lock held)."""
        if a.ended:
            return
        self.failed += 1
        self._finish(a, None, error=f"{type(e).__name__}: {e}")

    def _release_cancelled(self) -> None:
        for a in self._active:
            if a is not None and a.req.cancelled:
                self._finish(a, None, error="cancelled")

    def _finish(self, a: _Active, reason: str | None, error: str | None = None, flush: bool = True) -> None:
        """Free ``a``'s slot and emit its last event (lock held)."""
        if self._active[a.req.slot] is a:
            self._active[a.req.slot] = None
        if a.ended:
            return
        if error is None and flush:
            try:
                tail = a.decoder.flush()
                if tail or a.pending:
                    self._push_text(a, tail, final=True)
            except Exception as e:
                log.exception("request %d: flushing its text failed", a.req.id)
                self.failed += 1
                reason, error = None, f"{type(e).__name__}: {e}"
        a.ended = True
        if error is not None:
            self.cancelled += error == "cancelled"
            self._emit(a, ("error", error))
            return
        self.finished += 1
        a.req.finish_reason = reason
        self._emit(a, ("done", reason))

    def _emit(self, a: _Active, ev: tuple) -> None:
        """Hand ``ev`` to the request's callback; a failing callback cancels that request only."""
        try:
            a.req.emit(ev)
        except Exception:
            log.exception("emit of request %d failed; cancelling it", a.req.id)
            a.req.cancel()

    def _prefill(self, group: list[_Active]) -> None:
        """Prefill the prompts of ``group`` in one forward and sample their first tokens. If that forward
        fails, each request is prefilled alone, so only the one that causes the failure ends."""
        try:
            logits = self.decoder.prefill_rows([a.req.prompt_ids for a in group],
                                               [a.req.slot for a in group])                  # (len(group), V)
            self.prefills += 1
        except Exception:
            if len(group) == 1:
                raise
            log.warning("prefill of %d requests together failed; prefilling them one by one", len(group),
                        exc_info=True)
            for a in group:
                self._guard(self._prefill, [a])
            return
        for i, a in enumerate(group):
            try:
                self._accept(a, self._sample(a, logits[i:i + 1]))
            except Exception as e:
                log.exception("request %d failed sampling its first token", a.req.id)
                with self._cond:
                    self._fail(a, e)

    def _decode(self, group: list[_Active]) -> None:
        live = [a for a in group if a.last is not None]
        logits = self.decoder.step([a.last for a in live], rows=[a.req.slot for a in live])   # (len(live), V)
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, len(live))
        self.decoded_rows += len(live)
        if any(a.greedy for a in live):
            best = logits.argmax(dim=-1).tolist()
        for i, a in enumerate(live):       # sampling and text are per request: a failure ends that row only
            try:
                tok = best[i] if a.greedy else self._sample(a, logits[i:i + 1])
                self._accept(a, tok)
            except Exception as e:
                log.exception("request %d failed in a decode step", a.req.id)
                with self._cond:
                    self._fail(a, e)

    def _sample(self, a: _Active, logits: torch.Tensor) -> int:
        p = a.req.params
        prev = None
        if p.repetition_penalty != 1.0:
            prev = torch.tensor([a.history], dtype=torch.int64, device=logits.device)
        return int(sample_next_token(logits, p.temperature, p.top_k, p.top_p, p.repetition_penalty,
                                     previous=prev, generator=a.generator))

    def _accept(self, a: _Active, tok: int) -> None:
        """Record token ``tok`` of request ``a``; finish it on a stop, its budget or a full context."""
        req, p = a.req, a.req.params
        with self._cond:
            if self._active[req.slot] is not a:
                return
            if req.cancelled:
                self._finish(a, None, error="cancelled")
                return
            if tok in a.stops:
                self._finish(a, "stop")
                return
            req.output_ids.append(tok)
            a.history.append(tok)
            if self._push_text(a, a.decoder.feed(tok)):
                self._finish(a, "stop", flush=False)
                return
            # budget spent, or the context is full once the next token goes in
            if len(req.output_ids) >= p.max_tokens or self.decoder.room(req.slot) <= 1:
                self._finish(a, "length")
                return
            a.last = tok

    def _push_text(self, a: _Active, piece: str, final: bool = False) -> bool:
        """Emit ``piece`` unless it may start a stop string; True when a stop string completed."""
        stops = a.req.params.stop
        text = a.pending + piece
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut:
                    a.req.text += text[:cut]
                    self._emit(a, ("text", text[:cut]))
                a.pending = ""
                return True
            keep = 0 if final else _hold_back(text, stops)
        else:
            keep = 0
        out, a.pending = (text[:len(text) - keep], text[len(text) - keep:]) if keep else (text, "")
        if out:
            a.req.text += out
            self._emit(a, ("text", out))
        return False


def collect(engine: Engine, prompt_ids: list[int], params: SamplingParams, timeout: float = 120.0) -> Request:
    """Submit one request and block until it finishes (for tests and scripts)."""
    done = threading.Event()
    events: list[tuple] = []

    def emit(ev):
        events.append(ev)
        if ev[0] in ("done", "error"):
            done.set()

    req = engine.submit(Request(list(prompt_ids), params, emit))
    if not done.wait(timeout):
        req.cancel()
        raise TimeoutError(f"request did not finish within {timeout} s")
    if events[-1][0] == "error":
        raise RuntimeError(events[-1][1])
    return req


__all__ = ["Engine", "EngineDeadError", "QueueFullError", "Request", "SamplingParams", "collect", "prefill_groups"]
