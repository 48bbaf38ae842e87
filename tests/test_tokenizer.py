"""Tokenizer: exact round trip for any Unicode text, special tokens, chat template and its mask."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import END, SPECIAL_TOKENS, ChatTokenizer, train_bpe

CORPUS = [
    "To be, or not to be, that is the question.",
    "The quick brown fox jumps over the lazy dog.",
    "Fix the grammar: he go home.",
    "Café naïve — 東京 🚀",
] * 20


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer(train_bpe(CORPUS, vocab_size=400, min_frequency=2))


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_encode_round_trips_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_have_fixed_ids_and_are_not_parsed_from_text(tok):
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tok.encode(f"say {END} now")
    assert tok.end_id not in ids
    assert tok.decode(ids) == f"say {END} now"


def test_vocab_size_and_save_load(tok, tmp_path):
    assert tok.vocab_size <= 400
    tok.save(tmp_path)
    again = ChatTokenizer.load(tmp_path)
    assert again.encode("the question") == tok.encode("the question")
    assert (tmp_path / "chat_template.json").is_file()


def test_chat_template_masks_only_assistant_tokens(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Fix: he go home."},
        {"role": "assistant", "content": "He goes home."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    enc = tok.render_chat(messages)
    assert len(enc.ids) == len(enc.assistant_mask)
    assert enc.ids[0] == tok.bos_id
    masked = [i for i, m in zip(enc.ids, enc.assistant_mask) if m]
    # Exactly the assistant contents, each closed by the end-of-turn token.
    expected = tok.encode("He goes home.") + [tok.end_id] + tok.encode("You are welcome.") + [tok.end_id]
    assert masked == expected
    # No role markers, system or user tokens carry loss.
    for i, m in zip(enc.ids, enc.assistant_mask):
        if i in tok.role_ids.values() or i == tok.bos_id:
            assert m == 0
    decoded = tok.decode(enc.ids)
    assert decoded.startswith("<|bos|><|system|>Be brief.<|end|><|user|>")


def test_generation_prompt_ends_with_assistant_marker(tok):
    enc = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert enc.ids[-1] == tok.role_ids["assistant"] and enc.assistant_mask[-1] == 0


def test_bad_role_is_named(tok):
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        tok.render_chat([{"role": "bot", "content": "x"}])
