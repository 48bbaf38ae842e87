"""lmforge.generation.introspect: what the playground shows is what the model and the sampler compute."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import tiny_gpt
from lmforge.generation.chat import ChatEngine
from lmforge.generation.engine import ServingEngine
from lmforge.generation.interface import Finished, Request
from lmforge.generation.introspect import STAGES, introspect, nearest_tokens, next_token_distribution, step
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model import Trace
from lmforge.tokenizer import ChatTokenizer, train_bpe
from test_service import CORPUS


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_gpt(80, block_size=32, n_head=4, n_kv_head=2).eval()
    with torch.no_grad():
        m.tok_emb.weight.mul_(3.0)
    return m


IDS = [5, 17, 3, 42, 8, 8, 21, 60, 2]


def test_traced_forward_is_the_model_forward_and_attention_rows_sum_to_one(model):
    x = torch.tensor([IDS])
    with torch.no_grad():
        trace = Trace()
        traced = model.lm_head(model.hidden_states(x, trace=trace))
        assert torch.allclose(traced, model(x), atol=1e-5)
    assert len(trace.attention) == model.config.n_layer and len(trace.residual) == model.config.n_layer + 1
    w = trace.attention[1][0]  # [H, T, T]
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-5)
    assert float(w.triu(1).abs().max()) == 0.0  # causal: no query sees a later key


def test_introspect_probabilities_entropy_and_logit_lens(model):
    out = introspect(model, IDS, top_k=4, attention_layers=[0, 1])
    with torch.no_grad():
        logp = model(torch.tensor([IDS]))[0].log_softmax(-1)
    for t, row in enumerate(out["next"]):
        best = logp[t].topk(4)
        assert [tok for tok, _ in row["top"]] == best.indices.tolist()
        assert [p for _, p in row["top"]] == pytest.approx(best.values.exp().tolist(), rel=1e-5)
        assert row["entropy"] == pytest.approx(float(-(logp[t].exp() * logp[t]).sum()), rel=1e-4)
    lens = out["logit_lens"]
    assert len(lens) == model.config.n_layer + 1
    # the last layer of the lens is the model's own prediction
    assert [tok for tok, _ in lens[-1]] == logp.argmax(-1).tolist()
    assert [p for _, p in lens[-1]] == pytest.approx(logp.max(-1).values.exp().tolist(), rel=1e-5)
    heads = out["attention"][1]
    assert len(heads) == model.config.n_head and len(heads[0]) == len(IDS) == len(heads[0][-1])
    with pytest.raises(ValueError, match="attention_layers"):
        introspect(model, IDS, attention_layers=[7])
    with pytest.raises(ValueError, match="context"):
        introspect(model, list(range(40)))


def test_nearest_tokens_by_cosine(model):
    near = nearest_tokens(model, 5, k=3)
    table = model.tok_emb.weight
    sims = torch.nn.functional.cosine_similarity(table, table[5][None], dim=-1)
    sims[5] = -2
    assert [t for t, _ in near] == sims.topk(3).indices.tolist()
    assert 5 not in [t for t, _ in near]


def test_distribution_stages_follow_the_sampler(model):
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    dist = next_token_distribution(model, IDS, params, top=80)
    with torch.no_grad():
        logits = model(torch.tensor([IDS]))[0, -1].float()
    by_id = {t["id"]: t for t in dist["tokens"]}
    # temperature alone is softmax(logits / T) on tokens the repetition penalty did not touch
    untouched = [t for t in by_id if t not in IDS]
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[IDS] = True
    penalized = torch.where(seen, torch.where(logits > 0, logits / 1.3, logits * 1.3), logits)
    want = (penalized / 0.7).softmax(-1)
    for t in untouched[:10]:
        assert by_id[t]["p_penalties_and_temperature"] == pytest.approx(float(want[t]), rel=1e-5)
    assert dist["kept"] <= 10
    kept = [t for t in dist["tokens"] if t["removed_by"] is None]
    assert sum(t["p"] for t in kept) == pytest.approx(1.0, abs=1e-5)
    assert {t["removed_by"] for t in dist["tokens"]} - {None} <= set(STAGES[1:])
    assert all(t["p"] == 0.0 for t in dist["tokens"] if t["removed_by"])
    assert by_id[int(logits.argmax())]["p_raw"] == pytest.approx(float(logits.softmax(-1).max()), rel=1e-5)


def test_step_draws_as_the_serving_engine_does():
    tok = ChatTokenizer(train_bpe(CORPUS, vocab_size=300))
    m = tiny_gpt(tok.vocab_size, block_size=64, n_head=2, n_kv_head=2).eval()
    chat = ChatEngine(m, tok)
    engine = ServingEngine(chat)
    ids = chat.prompt_ids("Once upon a time")
    try:
        for seed in range(6):
            params = SamplingParams(max_new_tokens=1, temperature=1.3, top_p=0.95, seed=seed)
            got: list = []
            done = threading.Event()

            def emit(i, event, got=got, done=done):
                if isinstance(event, Finished | Exception):
                    got.append(event)
                    done.set()

            # raw continuation: no stop tokens are in play for the first token here
            engine.submit(Request(ids, params, chat=False), emit)
            assert done.wait(30)
            first = got[0].generation.ids_with_stop[0]
            assert step(m, ids, chat.with_stops(params, False), seed) == first
    finally:
        engine.close(5)
