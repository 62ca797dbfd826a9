"""Perplexity / bits per byte with sliding windows, ``bitnet eval``, and the lm-evaluation-harness adapter."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bitnet import BitNetTransformer
from bitnet.evaluate import evaluate_text, token_nll, windows
from bitnet.generate import generate
from bitnet.io import save_checkpoint
from bitnet.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BitNetTransformer(256, 32, 2, heads=2, max_seq_len=32).eval()


def full_nll(model, ids):
    """Reference: one forward over the whole sequence (needs len(ids) <= max_seq_len + 1)."""
    x = torch.tensor(ids)
    with torch.no_grad():
        logp = F.log_softmax(model(x[None, :-1]).float(), -1)[0]
    return -logp.gather(-1, x[1:, None])[:, 0].double()


@pytest.mark.parametrize("n, context, stride", [(11, 4, 4), (11, 4, 2), (2, 4, 1), (50, 7, 3), (5, 10, 5), (33, 32, 32)])
def test_windows_score_every_target_exactly_once(n, context, stride):
    seen = []
    for b, e, first in windows(n, context, stride):
        assert 0 <= b < first <= e < n and e - b <= context
        seen += range(first, e + 1)
    assert seen == list(range(1, n))


def test_windows_match_the_lm_eval_rolling_example():
    # lm_eval.api.model.LM.loglikelihood_rolling docstring: BOS + 10 tokens, max length 4
    assert windows(11, 4, 4) == [(0, 4, 1), (4, 8, 5), (6, 10, 9)]


def test_one_window_equals_a_plain_forward(model):
    ids = list(range(40, 70))
    torch.testing.assert_close(token_nll(model, ids), full_nll(model, ids))


def test_sliding_windows_use_the_stated_history(model):
    ids = [int(i) for i in torch.randint(0, 256, (90,))]
    nll = token_nll(model, ids, context=16, stride=8, batch_size=3)
    # target j is scored by the window that ends at the first window end >= j: check each against a direct forward
    for b, e, first in windows(len(ids), 16, 8):
        ref = full_nll(model, ids[b:e + 1])                       # targets b+1..e
        torch.testing.assert_close(nll[first - 1:e], ref[first - b - 1:])
    assert torch.allclose(token_nll(model, ids, 16, 8, batch_size=1), nll)


def test_evaluate_text_numbers(model):
    text = "In the beginning God created the heaven and the earth. " * 3
    r = evaluate_text(model, ByteTokenizer(), text, context=32, stride=16)
    n = len(text.encode())
    assert r["tokens"] == n and r["predicted_tokens"] == n - 1 and r["bytes"] == n - 1
    assert math.isclose(r["perplexity"], math.exp(r["nll"]))
    assert math.isclose(r["bits_per_byte"], r["nll"] / math.log(2))             # bytes = tokens for bytes
    assert 100 < r["perplexity"] < 1000                                         # random model ~ vocab 256
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_text(model, ByteTokenizer(), "x")


def test_bitnet_eval_command(model, tmp_path):
    run = save_checkpoint(tmp_path / "run", model, tokenizer=ByteTokenizer())
    data = tmp_path / "heldout.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    from bitnet import load

    for flags, reference in ((["--no-pack"], model), ([], load(run, device="cpu").model)):   # default: packed
        proc = subprocess.run([sys.executable, "-m", "bitnet", "eval", str(run), "--data", str(data), "--context", "32",
                               "--stride", "8", *flags], capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        expected = evaluate_text(reference, ByteTokenizer(), data.read_text(), 32, 8)
        assert math.isclose(result["perplexity"], expected["perplexity"], rel_tol=1e-6), flags
        assert result["stride"] == 8 and "bits/byte" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "bitnet", "eval", str(run), "--data", str(tmp_path / "nope.txt")],
                         capture_output=True, text=True, env=env, timeout=240)
    assert bad.returncode == 1 and "not found" in bad.stderr


# --------------------------------------------------------------------------------------------- lm-eval

@pytest.fixture(scope="module")
def lm(model):
    pytest.importorskip("lm_eval")                    # the 'eval' extra
    from bitnet.lm_eval_adapter import BitNetLM

    return BitNetLM(model=model, tokenizer=ByteTokenizer(), batch_size=3, max_gen_toks=10)


def inst(kind, args, i=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_loglikelihood_matches_a_direct_forward(lm, model):
    pairs = [("The cat sat on the", " mat"), ("", "hello"), ("A b c ", "d"), ("x" * 40, " long context")]
    out = lm.loglikelihood([inst("loglikelihood", p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (lp, greedy) in zip(pairs, out):
        ctx_s, cont_s = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont
        ids = (list(ctx_s.encode()) or [ord("\n")]) + list(cont_s.encode())
        ids = ids[-33:]
        nll = full_nll(model, ids)[-len(cont_s.encode()):]
        assert math.isclose(lp, -float(nll.sum()), rel_tol=1e-5, abs_tol=1e-4)
        assert isinstance(greedy, bool)
    # a continuation made of the model's own greedy tokens is greedy
    ids = list(b"Once upon")
    greedy_cont = bytes(generate(model, ids, 3, temperature=0)).decode("latin-1")
    if greedy_cont.isascii():
        assert lm.loglikelihood([inst("loglikelihood", ("Once upon", greedy_cont))])[0][1] is True


def test_loglikelihood_rolling_scores_every_byte_once(lm, model):
    text = "Rolling perplexity over a document longer than the context window. " * 2
    (lp,) = lm.loglikelihood_rolling([inst("loglikelihood_rolling", (text,))])
    ids = [ord("\n")] + list(text.encode())
    assert math.isclose(lp, -float(token_nll(model, ids, 32, 32).sum()), rel_tol=1e-9)
    assert token_nll(model, ids, 32, 32).numel() == len(text.encode())


def test_generate_until_stops_and_matches_greedy_generate(lm, model):
    prompts = ["Question: 1+1=", "Hello", "abc"]
    free = [ByteTokenizer().decode(generate(model, list(p.encode()), 10, temperature=0)) for p in prompts]
    stop = free[0][3:5]
    reqs = [inst("generate_until", (prompts[0], {"until": [stop], "max_gen_toks": 10})),
            inst("generate_until", (prompts[1], {"until": ["\u2603"], "max_gen_toks": 10}), 1),
            inst("generate_until", (prompts[2], {"until": [], "max_gen_toks": 4}), 2)]
    out = lm.generate_until(reqs)
    assert out[0] == free[0][:free[0].find(stop)]
    assert out[1] == free[1]
    assert out[2] == ByteTokenizer().decode(generate(model, list(b"abc"), 4, temperature=0))


def test_a_tiny_local_task_through_simple_evaluate(lm, tmp_path):
    """A multiple-choice task built in-process from a local JSON file (no download), run by lm-eval."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate

    docs = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), "cat"], "label": 0}
            for a, b in [(1, 2), (3, 4), (5, 5), (2, 7)]]
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    config = {
        "task": "bitnet_tiny_arith", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}],
    }
    try:
        task = ConfigurableTask(config=config)
    except Exception as e:  # pragma: no cover - datasets missing or refusing local files
        pytest.skip(f"lm-eval cannot build a local task here: {e}")
    results = evaluate(lm=lm, task_dict={"bitnet_tiny_arith": task})
    acc = results["results"]["bitnet_tiny_arith"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert len(results["samples"]["bitnet_tiny_arith"]) == 4 if "samples" in results else True
