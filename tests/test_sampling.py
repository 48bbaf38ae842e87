"""Tests for generation (lmforge.generation.driver, sampling_params): logits filters (lmforge.generation.logits), determinism, stopping, batching, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_gpt
from lmforge.generation import logits as rowwise
from lmforge.generation.driver import generate
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model import GPT

VOCAB = 64


def sharp_gpt(seed: int = 0, block_size: int = 32) -> GPT:
    model = tiny_gpt(VOCAB, seed=seed, block_size=block_size).eval()
    # Sharpen the random model a little so greedy choices are not near-ties.
    with torch.no_grad():
        model.tok_emb.weight.mul_(5.0)
    return model


def decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i % 26) for i in ids)


PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [10, 11, 12, 13]]


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Every row of ``logits`` through :func:`lmforge.generation.logits.process` with the same ``params``
    (``seen``: [B, L] ids, negative = padding, or a bool [B, V] mask)."""
    knobs = rowwise.RowKnobs.of([params] * logits.shape[0], logits.shape[-1], logits.device)
    mask = None if seen is None else rowwise.presence_mask(seen, logits.shape[-1])
    return rowwise.process(logits, knobs, mask)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    return process_logits(logits, SamplingParams(top_k=k))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    return process_logits(logits, SamplingParams(top_p=top_p))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    return process_logits(logits, SamplingParams(min_p=min_p))


# --------------------------------------------------------------------------- filters


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    # Sorted: 0.5, 0.3, 0.15, 0.05 -> cumulative 0.5, 0.8, 0.95, 1.0.

    def kept(p: float) -> list[bool]:
        return torch.isfinite(top_p_filter(logits, p)).squeeze(0).tolist()

    assert kept(0.4) == [False, True, False, False]
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.9) == [False, True, True, True]
    assert kept(0.99) == [True, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # never empty


def test_top_k_and_min_p_filters() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).squeeze(0).tolist() == [False, True, True, False]
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, None), logits)

    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    # min_p 0.2 -> threshold 0.1: only the 0.08 token goes.
    assert torch.isfinite(min_p_filter(probs.log(), 0.2)).squeeze(0).tolist() == [True, True, True, False]
    assert torch.isfinite(min_p_filter(probs.log(), 0.7)).squeeze(0).tolist() == [True, False, False, False]


def test_repetition_penalty_lowers_positive_and_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    # With id lists (negative ids are padding and ignored).
    params = SamplingParams(repetition_penalty=2.0)
    out2 = process_logits(logits, params, torch.tensor([[0, 1, -1]]))
    assert out2.tolist() == out.tolist()


def test_process_logits_order_temperature_then_filters() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    out = process_logits(logits, SamplingParams(temperature=0.5, top_k=3))
    assert out[0, 0] == float("-inf")
    torch.testing.assert_close(out[0, 1:], torch.tensor([2.0, 4.0, 6.0]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop_strings": ("",)}, "stop_strings"),
        ({"stop_strings": "x"}, "stop_strings"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- generation


def test_greedy_variants_agree() -> None:
    model = sharp_gpt()
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0))
    top1 = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=3))
    assert [g.token_ids for g in greedy] == [g.token_ids for g in top1]
    # Greedy == step-by-step argmax of the full forward pass.
    ids = list(PROMPTS[0])
    for _ in range(8):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert greedy[0].token_ids == ids[len(PROMPTS[0]) :]
    assert all(g.finish_reason == "length" and len(g.token_ids) == 8 for g in greedy)


def test_seed_determinism() -> None:
    model = sharp_gpt()
    p = SamplingParams(max_new_tokens=16, temperature=5.0, seed=123)
    a = generate(model, PROMPTS, p)
    b = generate(model, PROMPTS, p)
    c = generate(model, PROMPTS, SamplingParams(max_new_tokens=16, temperature=5.0, seed=124))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_batched_equals_per_prompt_greedy() -> None:
    model = sharp_gpt()
    params = SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.3)
    batched = generate(model, PROMPTS, params, pad_id=5)
    for prompt, gen in zip(PROMPTS, batched, strict=True):
        assert generate(model, [prompt], params)[0].token_ids == gen.token_ids


def test_stop_token_ids() -> None:
    model = sharp_gpt()
    free = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0))
    stop = free[0].token_ids[3]
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(stop,)))
    first = free[0].token_ids.index(stop)
    assert out[0].token_ids == free[0].token_ids[:first]
    assert out[0].finish_reason == "stop" and out[0].stop_token_id == stop
    # Rows that never produce the stop token are unaffected by the other row stopping.
    for f, o in zip(free[1:], out[1:], strict=True):
        if stop not in f.token_ids:
            assert o.token_ids == f.token_ids and o.finish_reason == "length"


def test_stop_strings_truncate_text_and_tokens() -> None:
    model = sharp_gpt()
    free = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=0), decode=decode)[0]
    stop_str = free.text[4:6]
    cut = free.text.index(stop_str)
    out = generate(
        model,
        [PROMPTS[0]],
        SamplingParams(max_new_tokens=10, temperature=0, stop_strings=("zzzz", stop_str), logprobs=1),
        decode=decode,
    )[0]
    assert out.finish_reason == "stop" and out.stop_string == stop_str
    assert out.text == free.text[:cut]
    assert out.token_ids == free.token_ids[:cut]  # one char per token in this decode
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    with pytest.raises(ValueError, match="decode"):
        generate(model, [PROMPTS[0]], SamplingParams(stop_strings=("x",)))


def test_logprobs_consistent_with_processed_logits() -> None:
    model = sharp_gpt()
    params = SamplingParams(max_new_tokens=5, temperature=0.8, top_k=10, seed=1, logprobs=3)
    gen = generate(model, [PROMPTS[1]], params)[0]
    assert gen.logprobs is not None and gen.top_logprobs is not None
    ids = list(PROMPTS[1])
    for tok, lp, top in zip(gen.token_ids, gen.logprobs, gen.top_logprobs, strict=True):
        with torch.no_grad():
            ref = process_logits(model(torch.tensor([ids]))[0, -1:], params).log_softmax(-1)[0]
        assert lp == pytest.approx(ref[tok].item(), abs=1e-5)
        assert [t for t, _ in top] == ref.topk(3).indices.tolist()
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 and math.isfinite(v) for v in values)
        ids.append(tok)
    assert generate(model, [PROMPTS[1]], SamplingParams(max_new_tokens=2))[0].logprobs is None


def test_max_new_tokens_and_block_size() -> None:
    model = sharp_gpt(block_size=16)
    out = generate(model, [[1, 2, 3], list(range(1, 13))], SamplingParams(max_new_tokens=6, temperature=0))
    assert len(out[0].token_ids) == 6 and out[0].finish_reason == "length"
    assert len(out[1].token_ids) == 4 and out[1].finish_reason == "length"  # 12 + 4 = block_size
    full = generate(model, [list(range(1, 17))], SamplingParams(max_new_tokens=3), decode=decode)[0]
    assert full.token_ids == [] and full.finish_reason == "length" and full.text == ""
    with pytest.raises(ValueError, match="block_size"):
        generate(model, [list(range(17))], SamplingParams())
