"""A verifiable task: answers a program checks, for RL with verifiable rewards (RLVR) and for an
evaluation no model judges.

The task is "copying with a twist": reverse a short sequence of 2 to 4 letters. ``Reverse: k e y``
is answered ``y e k``. Every answer has exactly one correct form and fresh sequences are unlimited,
so held-out items are never seen in training; the tiny preset's SFT gets about 15% of them right
(docs/benchmarks.md), room for RL to move either way. The reply is correct when its first line, with spaces normalised, is the reversed
sequence.

* :func:`examples`: the bundled dialogues (``data/raw/reverse``), generated from a seed;
* :func:`question_of` / :func:`is_correct`: find the task in a prompt's text, check a reply;
* :class:`VerifierReward`: a :data:`~lmforge.training.rollouts.RewardFn` scoring 1 for a correct
  reply and 0 otherwise, handing prompts that are not the task to another reward (``mix``).

Training core: torch, tokenizers and the standard library.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmforge.tokenizer import ChatTokenizer
from lmforge.training.rollouts import RewardFn

PREFIX = "Reverse:"
_QUESTION = re.compile(r"Reverse:((?: [a-z]){2,12})\s*$")


def question(letters: Sequence[str]) -> str:
    return f"{PREFIX} {' '.join(letters)}"


def answer(letters: Sequence[str]) -> str:
    return " ".join(reversed(letters))


def examples(count: int, seed: int, min_len: int = 2, max_len: int = 4) -> list[list[dict]]:
    """``count`` distinct task dialogues ([user question, assistant answer]), drawn from ``seed``."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()
    out = []
    while len(out) < count:
        letters = tuple(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))
        if letters in seen:
            continue
        seen.add(letters)
        out.append(
            [
                {"role": "user", "content": question(letters)},
                {"role": "assistant", "content": answer(letters)},
            ]
        )
    return out


def question_of(text: str) -> list[str] | None:
    """The letters of the task question that ends ``text`` (a user message), or None."""
    match = _QUESTION.search(text.strip())
    return match.group(1).split() if match else None


def is_correct(letters: Sequence[str], reply: str) -> bool:
    """The reply's first line, spaces normalised, is the reversed sequence."""
    lines = reply.strip().splitlines()
    return bool(lines) and " ".join(lines[0].split()) == answer(letters)


def question_turn(dialogue: Sequence[dict]) -> list[dict]:
    """The conversation a model answers: the dialogue's last user turn alone (its question)."""
    return [m for m in dialogue if m.get("role") != "assistant"][-1:]


def is_task(dialogue: Sequence[dict]) -> bool:
    """A dialogue whose last user message is the task question."""
    users = [m for m in dialogue if m.get("role") == "user"]
    return bool(users) and question_of(str(users[-1].get("content", ""))) is not None


class VerifierReward(nn.Module):
    """Score replies by checking them: 1.0 correct, 0.0 not (no partial credit: on the tiny preset a
    share-of-letters reward taught the policy half answers; docs/benchmarks.md). A prompt that is not the task goes to
    ``other`` (the reward model, for ``rlhf.reward: mix``), or scores 0 without one. An nn.Module so
    that the Trainer moves ``other`` (a :class:`~lmforge.training.rollouts.RewardModelFn`) with it."""

    def __init__(self, tok: ChatTokenizer, other: RewardFn | None = None) -> None:
        super().__init__()
        self.tok, self.other = tok, other

    def letters(self, prompt: Sequence[int]) -> list[str] | None:
        """The task's letters when the prompt's last user turn is the task (special tokens, the chat
        template's roles, decode to nothing)."""
        return question_of(self.tok.decode(list(prompt), skip_special=True))

    def forward(self, prompts: list[list[int]], replies: list[list[int]]) -> Tensor:
        scores = torch.zeros(len(prompts), dtype=torch.float32)
        others = []
        for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
            letters = self.letters(prompt)
            if letters is None:
                others.append(i)
                continue
            scores[i] = float(is_correct(letters, self.tok.decode(list(reply), skip_special=True)))
        if others and self.other is not None:
            picked = self.other([prompts[i] for i in others], [replies[i] for i in others])
            scores[torch.tensor(others)] = torch.as_tensor(picked, dtype=torch.float32).cpu()
        return scores
