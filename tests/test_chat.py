"""Chat formatting, history trimming, and ``bitnet chat`` as a real process fed on stdin."""

import os
import subprocess
import sys

import pytest
import torch

from bitnet import BitNetTransformer
from bitnet.chat import PLAIN_STOP, check_messages, fit_history, format_chat
from bitnet.generate import generate
from bitnet.io import save_checkpoint
from bitnet.tokenizer import ByteTokenizer


def test_plain_turns():
    prompt, stops = format_chat([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": [{"type": "text", "text": "How "}, {"type": "text", "text": "are you?"}]}])
    assert prompt == "System: Be kind.\nUser: Hi\nAssistant: Hello!\nUser: How are you?\nAssistant:"
    assert stops == PLAIN_STOP == ("\nUser:",)


def test_tokenizer_chat_template_wins():
    class FakeHF:
        chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    class Tok:
        hf = FakeHF()

    assert format_chat([{"role": "user", "content": "Hi"}], Tok()) == ("<user>Hi<assistant>", ())


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ("hi", "non-empty"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\].role"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "only text"),
])
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        check_messages(messages)


def test_fit_history_drops_oldest_turns_but_keeps_system_and_last():
    tok = ByteTokenizer()
    msgs = [{"role": "system", "content": "S"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " + "x" * 20} for i in range(6)]
    kept, dropped = fit_history(msgs, tok, 90)
    assert dropped > 0 and kept[0]["role"] == "system" and kept[-1] == msgs[-1]
    assert kept[1:] == msgs[1 + dropped:]
    assert len(tok.encode(format_chat(kept, tok)[0])) <= 90
    assert fit_history(msgs, tok, 10_000) == (msgs, 0)
    with pytest.raises(ValueError, match="last message"):
        fit_history(msgs, tok, 10)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    torch.manual_seed(1)
    model = BitNetTransformer(256, 32, 1, heads=2, max_seq_len=96).eval()
    run = tmp_path_factory.mktemp("chat") / "run"
    save_checkpoint(run, model, tokenizer=ByteTokenizer())
    return model, run


def run_chat(run, stdin: str, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "bitnet", "chat", str(run), "--temperature", "0", *flags],
                          input=stdin.encode(), capture_output=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode("utf-8")


def answer(model, messages, max_new):
    tok = ByteTokenizer()
    prompt, stops = format_chat(messages, tok)
    text = tok.decode(generate(model, tok.encode(prompt), max_new, temperature=0))
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text


def test_chat_process_streams_answers_resets_and_exits(chat_model):
    model, run = chat_model
    out = run_chat(run, "Hello\nHow are you?\n/reset\nHi again\n/exit\nnever read\n", "--max-new-tokens", "12",
                   "--no-pack")
    first = answer(model, [{"role": "user", "content": "Hello"}], 12)
    second = answer(model, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.strip()},
                            {"role": "user", "content": "How are you?"}], 12)
    after_reset = answer(model, [{"role": "user", "content": "Hi again"}], 12)
    assert out.startswith("bitnet chat (")
    assert "Assistant:" + first + "\n" in out
    assert "Assistant:" + second + "\n" in out
    assert "[conversation reset]\n" + "Assistant:" + after_reset + "\n" in out
    assert out.count("Assistant:") == 3                       # nothing after /exit


def test_chat_process_drops_old_turns_when_the_context_is_full(chat_model):
    _, run = chat_model
    lines = "".join(f"turn {i} {'y' * 15}\n" for i in range(4))
    out = run_chat(run, lines, "--max-new-tokens", "8")
    assert "[context full: dropped the" in out
    assert out.count("Assistant:") == 4


def test_chat_rejects_bad_flags(chat_model):
    _, run = chat_model
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bitnet", "chat", str(run), "--top-p", "0"], input=b"",
                          capture_output=True, env=env, timeout=240)
    assert proc.returncode == 1 and b"top_p" in proc.stderr


def test_chat_packs_by_default_on_the_cpu(chat_model):
    """Without flags the chat runs the packed form bitnet.load gives (2-bit weights, int8 head)."""
    from bitnet import load
    from bitnet.convert.pack import is_packed

    model, run = chat_model
    loaded = load(run, device="cpu")
    assert loaded.packed and is_packed(loaded.model)
    out = run_chat(run, "Hello\n", "--max-new-tokens", "12")
    packed_answer = answer(loaded.model, [{"role": "user", "content": "Hello"}], 12)
    assert "Assistant:" + packed_answer + "\n" in out
