"""Tokenizer: exact round trip for any Unicode text, special tokens, chat template and its mask;
the stage's training input: streamed, and under a byte budget a deterministic bounded sample."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.stages import is_run_record_key
from lmforge.stages.tokenizer import budget_texts, choose_sample, sample_key
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


# ---- training input from a stream, under a byte budget ------------------------------------------
DOCS = [f"document {i}: " + "word " * (i % 37) + "é" * (i % 5) for i in range(400)]


def utf8(text: str) -> int:
    return len(text.encode("utf-8"))


def test_budget_sample_is_the_smallest_keys_prefix_bounded_and_order_free():
    budget = sum(map(utf8, DOCS)) // 4
    positions, n_docs, n_bytes = choose_sample(iter(DOCS), budget)
    assert (n_docs, n_bytes) == (len(DOCS), sum(map(utf8, DOCS)))
    assert positions == sorted(positions) and sum(utf8(DOCS[p]) for p in positions) <= budget
    # Exactly the longest prefix, in (key, position) order, that fits the budget.
    order = sorted(range(len(DOCS)), key=lambda p: (sample_key(DOCS[p]), p))
    sizes = np.cumsum([utf8(DOCS[p]) for p in order])
    k = int(np.searchsorted(sizes, budget, side="right"))
    assert positions == sorted(order[:k]) and k < len(DOCS)
    # Deterministic, and the same documents whatever the corpus order (the key is the content).
    assert choose_sample(iter(DOCS), budget)[0] == positions
    shuffled = DOCS[:]
    random.Random(0).shuffle(shuffled)
    again, _, _ = choose_sample(iter(shuffled), budget)
    assert sorted(shuffled[p] for p in again) == sorted(DOCS[p] for p in positions)
    # A budget above the corpus takes everything; one below the smallest document takes nothing.
    assert choose_sample(iter(DOCS), 10**9)[0] == list(range(len(DOCS)))
    assert choose_sample(iter(DOCS), 1)[0] == []


def test_budget_texts_streams_the_sample_in_corpus_order_or_everything():
    calls = []

    def make():
        calls.append(1)
        return iter(DOCS)

    texts, stats = budget_texts(make, None)
    assert list(texts) == DOCS and len(calls) == 1  # no budget: one pass, everything, in order
    assert stats["documents"] == stats["corpus_documents"] == len(DOCS)
    assert stats["bytes"] == stats["corpus_bytes"] == sum(map(utf8, DOCS))
    budget = 3000
    texts, stats = budget_texts(make, budget)
    got = list(texts)
    positions, _, _ = choose_sample(iter(DOCS), budget)
    assert got == [DOCS[p] for p in positions] and len(calls) == 3  # choose, then train
    assert stats["documents"] == len(got) and stats["bytes"] == sum(map(utf8, got)) <= budget
    assert stats["corpus_documents"] == len(DOCS)


def tiny_project(root: Path, train: list[str], val: list[str], dialogues: list[list[dict]] | None = None):
    """Ingested splits (Parquet, as the ingest stage writes them) in a fresh project folder; the
    params of the bundled params.yaml with `dialogues` as the SFT train split (none: off)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.params import load_params

    root.mkdir(parents=True, exist_ok=True)
    for split, texts in (("train", train), ("val", val)):
        (root / "data/processed/text").mkdir(parents=True, exist_ok=True)
        table = pa.table({"text": texts, "source": ["t"] * len(texts)})
        pq.write_table(table, root / "data/processed/text" / f"{split}.parquet", row_group_size=7)
    if dialogues is not None:
        (root / "data/processed/sft").mkdir(parents=True, exist_ok=True)
        table = pa.table({"messages": dialogues, "source": ["s"] * len(dialogues)})
        pq.write_table(table, root / "data/processed/sft/train.parquet")
    overrides = [] if dialogues is not None else ["tokenizer.include_dialogues=false"]
    return load_params(
        Path(__file__).resolve().parents[1] / "params.yaml", ["tokenizer.vocab_size=300", *overrides]
    )


CHATS = [
    [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i} " * 3}]
    for i in range(30)
]


def test_tokenizer_stage_streams_samples_and_records_its_input(tmp_path):
    from lmforge.stages import tokenizer as stage

    train = [" ".join(DOCS[i : i + 3]) for i in range(0, 300)]
    val = DOCS[300:]
    params = tiny_project(tmp_path, train, val, CHATS)
    texts = list(stage.training_texts(tmp_path, params))
    assert texts == train + [m["content"] for chat in CHATS for m in chat]  # corpus order, dialogues last
    assert stage.training_records(tmp_path, params) == len(texts)

    full = stage.run(params, tmp_path)
    assert full["train_documents"] == full["train_corpus_documents"] == len(texts)
    assert full["train_bytes"] == full["train_corpus_bytes"] == sum(map(utf8, texts))
    assert full["val_bytes"] == sum(map(utf8, val))
    # Same as training on the list in memory (what the stage did before it streamed).
    in_memory = train_bpe(texts, params.tokenizer.vocab_size, params.tokenizer.min_frequency)
    saved = json.loads((tmp_path / "data/tokenizer/tokenizer.json").read_text())
    assert saved["model"] == json.loads(in_memory.to_str())["model"]

    budget = full["train_bytes"] // 3
    capped = params.model_copy(
        update={"tokenizer": params.tokenizer.model_copy(update={"max_train_bytes": budget})}
    )
    first = stage.run(capped, tmp_path)
    tok_first = (tmp_path / "data/tokenizer/tokenizer.json").read_bytes()
    second = stage.run(capped, tmp_path)
    assert (tmp_path / "data/tokenizer/tokenizer.json").read_bytes() == tok_first  # deterministic
    stable = [{k: v for k, v in m.items() if not is_run_record_key(k)} for m in (first, second)]
    assert stable[0] == stable[1]
    assert 0 < first["train_bytes"] <= budget and first["train_documents"] < len(texts)
    assert first["train_corpus_bytes"] == full["train_bytes"]
