import pytest
import torch

from bitnet.tokenizer import ByteTokenizer, tokenizer_from_config


def test_bytes_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    assert tok.vocab_size == 256 and tok.decode(tok.encode(text)) == text
    assert tok.decode(torch.tensor(tok.encode(text))) == text
    eos = ByteTokenizer(["<eos>"])
    ids = eos.encode("ab", add_eos=True)
    assert ids == [97, 98, 256] and eos.vocab_size == 257 and eos.eos_id == 256
    assert eos.decode(ids) == "ab<eos>" and eos.decode(ids, skip_special_tokens=True) == "ab"
    assert eos.encode("<eos>") == list(b"<eos>")                     # text never becomes a special id
    assert tokenizer_from_config(eos.to_config()).special_tokens == ("<eos>",)


def test_decode_replaces_invalid_utf8_and_rejects_bad_ids():
    tok = ByteTokenizer()
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"                       # cut multi-byte character
    with pytest.raises(ValueError, match="256"):
        tok.decode([256])
    with pytest.raises(ValueError, match="add_eos"):
        tok.encode("x", add_eos=True)


def test_stream_decoder_keeps_characters_whole():
    tok = ByteTokenizer()
    dec = tok.stream_decoder()
    pieces = [dec.feed(i) for i in "a✓b".encode()] + [dec.flush()]
    assert pieces == ["a", "", "", "✓", "b", ""]
