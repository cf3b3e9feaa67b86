"""Our tokenizer wrapper against transformers' AutoTokenizer on the same directory: encoding with
special tokens, chat templates, and streaming detokenization of multi-byte text."""

from __future__ import annotations

import pytest

from tandem.engine.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")
TEXTS = ["Hello, world!", "Café in Zürich costs 3.14 francs 🚀", "东京 and 서울", "  spaces\tand\nlines"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matches_transformers(model_factory, arch):
    d = model_factory(arch)
    ours, theirs = Tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    for t in TEXTS:
        assert ours.encode(t) == theirs(t)["input_ids"]
        assert ours.decode(ours.encode(t)) == theirs.decode(theirs(t)["input_ids"], skip_special_tokens=True)
    assert ours.encode_chat(MESSAGES) == list(theirs.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                                         tokenize=True, return_dict=False))
    if arch == "llama":
        assert ours.encode("x")[0] == ours._tok.token_to_id("<|begin_of_text|>")


def test_incremental_detokenizer_never_splits_characters(tiny_llama):
    tok = Tokenizer(tiny_llama)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        det = IncrementalDetokenizer(tok)
        pieces = [det.add([i]) for i in ids] + [det.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)
