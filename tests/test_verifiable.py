"""The verifiable task (reverse a few letters): the bundled data, the checker, the verifier reward
(alone and mixed with a reward model), and the task accuracy the evaluation reports."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import tiny_gpt
from lmforge.evaluation import task_scores
from lmforge.generation.chat import ChatEngine
from lmforge.generation.sampling_params import SamplingParams
from lmforge.tokenizer import ChatTokenizer, train_bpe
from lmforge.training.verifiable import (
    VerifierReward,
    answer,
    examples,
    is_correct,
    is_task,
    question_of,
)

REPO = Path(__file__).resolve().parents[1]


def test_examples_are_seeded_distinct_and_match_the_bundled_file():
    first, again = examples(50, seed=0), examples(50, seed=0)
    assert first == again and examples(50, seed=1) != first
    questions = [d[0]["content"] for d in examples(2000, seed=0)]
    assert len(set(questions)) == 2000
    bundled = [json.loads(line)["messages"] for line in (REPO / "data/raw/reverse/reverse.jsonl").open()]
    assert bundled == examples(2000, seed=0)  # the README's command regenerates the same bytes
    for dialogue in bundled[:20]:
        letters = question_of(dialogue[0]["content"])
        assert letters and 2 <= len(letters) <= 4 and dialogue[1]["content"] == answer(letters)


def test_the_checker():
    assert question_of("Reverse: k e y") == ["k", "e", "y"]
    assert question_of("earlier text\nReverse: a b") == ["a", "b"]
    assert question_of("Reverse: key") is None and question_of("What is 2 + 2?") is None
    assert is_correct(["k", "e", "y"], "y e k") and is_correct(["k", "e", "y"], "  y  e k \nmore")
    assert not is_correct(["k", "e", "y"], "k e y") and not is_correct(["k", "e", "y"], "")
    assert is_task([{"role": "user", "content": "Reverse: a b c"}, {"role": "assistant", "content": "c b a"}])
    assert not is_task([{"role": "user", "content": "hello"}])


def _tok() -> ChatTokenizer:
    texts = [d[0]["content"] + " " + d[1]["content"] for d in examples(200, seed=3)] + ["hello there"] * 20
    return ChatTokenizer(train_bpe(texts, vocab_size=300))


def test_verifier_reward_checks_the_task_and_hands_the_rest_to_the_model():
    tok = _tok()
    task = tok.render_chat([{"role": "user", "content": "Reverse: k e y"}], add_generation_prompt=True).ids
    chat = tok.render_chat([{"role": "user", "content": "hello there"}], add_generation_prompt=True).ids
    right, wrong = tok.encode(" y e k") + [tok.end_id], tok.encode("k e y")
    alone = VerifierReward(tok)
    assert alone([task, task, chat], [right, wrong, right]).tolist() == [1.0, 0.0, 0.0]

    class Model(torch.nn.Module):  # a reward model stand-in: scores by reply length
        def forward(self, prompts, replies):
            return torch.tensor([float(len(r)) for r in replies])

    mixed = VerifierReward(tok, Model())
    assert mixed([task, chat, task], [wrong, right, right]).tolist() == [0.0, float(len(right)), 1.0]
    assert isinstance(mixed.other, torch.nn.Module)  # a submodule: the Trainer moves it to the device


def test_task_accuracy_is_checked_greedy_replies():
    tok = _tok()
    engine = ChatEngine(tiny_gpt(tok.vocab_size, block_size=64), tok)
    tasks = examples(6, seed=9)
    scores = task_scores(engine, tasks, max_new_tokens=6)
    assert len(scores) == 6 and set(scores) <= {0.0, 1.0}
    # Whatever the untrained model says, the score is what the checker says of its greedy reply.
    replies = engine.chat([[d[0]] for d in tasks], SamplingParams(max_new_tokens=6, temperature=0.0))
    assert scores == [
        float(is_correct(question_of(d[0]["content"]), r.text or "")) for d, r in zip(tasks, replies)
    ]
