"""``bitnet serve`` / ``bitnet chat`` on a Hugging Face folder: the tokenizer's chat template is applied and
answers stop at its end-of-turn token; the model name of a folder and of a Hub id."""

import argparse
import io
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_loading import EOT, TEMPLATE, VOCAB, write_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def eot_folder(tmp_path_factory):
    """A BitLlama folder whose head is all zeros: every logit ties, greedy decoding picks id 0 = <|eot_id|>,
    so an answer ends at once exactly when <|eot_id|> is a stop id."""
    from bitnet import BitLlamaConfig, BitLlamaForCausalLM

    torch.manual_seed(0)
    config = BitLlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=96)
    model = BitLlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    folder = tmp_path_factory.mktemp("eot") / "eot-model"
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def test_serve_applies_the_chat_template_and_stops_at_end_of_turn(eot_folder):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from bitnet.serve.app import create_app
    from bitnet.serve.server import ServerThread, default_model_name, load_engine

    engine = load_engine(eot_folder, slots=1, device="cpu", pack=False)
    tok = engine.tokenizer
    assert tok.chat_template == TEMPLATE
    assert 0 in tok.stop_ids and tok.hf.convert_ids_to_tokens(0) == EOT
    assert default_model_name(eot_folder) == "eot-model" and default_model_name("org/model-1.5B") == "org/model-1.5B"
    with ServerThread(create_app(engine, default_model_name(eot_folder))) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 20}).json()
        assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["message"]["content"] == ""
        assert r["usage"]["completion_tokens"] == 0
        # the prompt is the rendered template: BOS + "User: hello<|eot_id|>Assistant: "
        rendered = tok.hf.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                              add_generation_prompt=True)
        assert r["usage"]["prompt_tokens"] == len(tok.encode(rendered))
        info = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"][0]
        assert info["id"] == "eot-model" and info["context_length"] == 96


def test_chat_command_uses_the_template_and_ends_turns_at_end_of_turn(eot_folder):
    from bitnet.chat import run

    args = argparse.Namespace(model=str(eot_folder), device="cpu", pack=False, threads=None, system=None,
                              max_new_tokens=20, temperature=0.0, top_k=None, top_p=None, repetition_penalty=None,
                              seed=None, stats=True)
    out = io.StringIO()
    assert run(args, stdin=io.StringIO("hello\n/exit\n"), stdout=out) == 0
    text = out.getvalue()
    assert "its chat template" in text and "Assistant:\n" in text        # empty answer: stopped at <|eot_id|>



def test_missing_extra_hint_names_the_clone_install():
    """`pip install 'bitnet[serve]'` would fetch an unrelated PyPI project: the hint says ".[serve]" from a clone."""
    from bitnet.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    serve_help = sub.choices["serve"].description
    assert ".[serve]" in serve_help and "bitnet[serve]" not in serve_help
