"""Byte-level BPE tokenizer (HF `tokenizers`) with lmforge's special tokens and chat template.

The chat template renders a conversation as

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

and returns, beside the token ids, an `assistant_mask` that is 1 exactly on the tokens the
assistant wrote (its content and its closing <|end|>, so the model learns to stop) and 0
on everything else. SFT puts loss only where the mask is 1.

Message contents are encoded with special-token parsing off: a user who types "<|end|>"
gets those characters, not the control token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.tool_calls import template_messages

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
END = "<|end|>"  # end of turn
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS.values(), END)
CHAT_TEMPLATE = {
    "bos": BOS,
    "roles": ROLE_TOKENS,
    "end_of_turn": END,
    "format": "{bos}" + "{role_token}{content}{end_of_turn}" + "...",
    "generation_prompt": ROLE_TOKENS["assistant"],
    "loss_on": "assistant content and its end_of_turn",
}


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer; ids 0..len(SPECIAL_TOKENS)-1 are the special tokens."""
    tok = Tokenizer(models.BPE())
    # No normalizer: byte-level BPE must reproduce any input exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@dataclass(frozen=True)
class ChatEncoding:
    ids: list[int]
    assistant_mask: list[int]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = _byte_decoder()


class ChatTokenizer:
    """Encode/decode text and render chats; wraps a `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer):
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"tokenizer lacks special tokens {missing}; train it with lmforge.tokenizer.train_bpe"
            )
        self.tok = tok
        self.tok.encode_special_tokens = True  # content is text, never control tokens
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.bos_id, self.eos_id, self.pad_id, self.end_id = ids[BOS], ids[EOS], ids[PAD], ids[END]
        self.role_ids = {role: ids[t] for role, t in ROLE_TOKENS.items()}
        self.special_ids = frozenset(ids.values())
        self._added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}  # id -> name

    # ---- persistence -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> ChatTokenizer:
        """Load from a `tokenizer.json` file or a folder holding one."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: tokenizer not found; run the tokenizer stage first")
        return cls(Tokenizer.from_file(str(file)))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))
        (folder / "chat_template.json").write_text(json.dumps(CHAT_TEMPLATE, indent=2) + "\n")
        return folder / "tokenizer.json"

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    # ---- text --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def stop_ids(self, chat: bool) -> tuple[int, ...]:
        """The tokens that end a generated reply (the one place this rule lives): <|end|> or <|eos|>
        for a chat turn; <|eos|> or a new document's <|bos|> for raw text."""
        return (self.end_id, self.eos_id) if chat else (self.eos_id, self.bos_id)

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, ids: Sequence[int]) -> list[tuple[bytes, bool]]:
        """Each id's exact bytes (byte-level BPE: a token may hold part of a UTF-8 character) and
        whether it is a special token (its bytes are then its name, e.g. ``<|user|>``)."""
        out = []
        for i in ids:
            if i in self._added:
                out.append((self._added[i].encode(), True))
            else:
                piece = self.tok.id_to_token(int(i)) or ""
                out.append((bytes(_BYTE_DECODER.get(ch, 0) for ch in piece), False))
        return out

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each id's text as bytes decoded on its own (partial UTF-8 shows as U+FFFD)."""
        return [self.decode([i]) for i in ids]

    # ---- chat --------------------------------------------------------------------------
    def render_chat(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        tools: Sequence[dict] | None = None,
    ) -> ChatEncoding:
        """Render a conversation to ids and the assistant mask (see module docstring). Tool calls,
        tool results and offered ``tools`` are rendered as :mod:`lmforge.tool_calls` specifies."""
        messages = template_messages(messages, tools)
        ids, mask = [self.bos_id], [0]
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in self.role_ids:
                raise ValueError(f"messages[{i}].role must be one of {sorted(self.role_ids)}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
            body = self.encode(content) + [self.end_id]
            ids += [self.role_ids[role], *body]
            is_assistant = int(role == "assistant")
            mask += [0] + [is_assistant] * len(body)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ChatEncoding(ids, mask)
