"""lm-evaluation-harness on our engine (issue 24): the LM wrapper's three request types checked
against direct forward passes and our own evaluation code, on tiny models and tiny held-out splits,
and one task scored both in process and through the running service (`lm_eval --model
local-chat-completions`), reply for reply."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import datasets
import pytest
import torch

from conftest import tiny_gpt
from lmforge.evaluation import document_nll
from lmforge.generation.chat import ChatEngine
from lmforge.harness.run import TASKS_DIR, evaluate
from lmforge.tokenizer import ChatTokenizer, train_bpe
from lmforge.training import verifiable
from test_service import BIN, REPO, run_self, running_server

DATA = "data/processed"
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "birds",
    "sing",
    "in",
    "the",
    "old",
    "oak",
    "tree",
]


def write_split(root: Path, kind: str, rows: list[dict]) -> None:
    path = root / DATA / kind / "val.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def held_out(root: Path, texts: list[str]) -> None:
    """Tiny ingested val splits: documents, task dialogues among chat dialogues, preference pairs."""
    write_split(root, "text", [{"text": t, "source": "t"} for t in texts])
    chat = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]]
    tasks = verifiable.examples(12, seed=3)
    write_split(root, "sft", [{"messages": m, "source": "s"} for m in chat + tasks])
    pairs = [
        {
            "prompt": [{"role": "user", "content": f"say {w}"}],
            "chosen": f"{w} {w}",
            "rejected": w,
            "source": "p",
        }
        for w in WORDS[:9]
    ]
    write_split(root, "preference", pairs)


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    tok = ChatTokenizer(train_bpe(corpus + ["Reverse: a b c d e f"], vocab_size=320))
    model = tiny_gpt(tok.vocab_size, block_size=32, n_head=2, n_kv_head=2, seed=1).eval()
    return ChatEngine(model, tok)


def texts() -> list[str]:
    # several windows of 32 tokens per document, so the rolling windows' last-window rule matters
    return [" ".join(WORDS[i:] + WORDS[:i]) * 5 for i in range(0, 12, 3)] + ["fox"]


@torch.inference_mode()
def direct_logprob(engine: ChatEngine, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one forward pass over the whole sequence (no cache)."""
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(engine.model(ids[:, :-1]).float(), dim=-1)[0]
    start = len(context) - 1
    return sum(float(logprobs[start + i, t]) for i, t in enumerate(continuation))


def test_harness_figures_agree_with_our_own_code(engine, tmp_path):
    held_out(tmp_path, texts())
    out = evaluate(engine, tmp_path, data=DATA, max_gen_toks=6, seed=0)
    figures, samples = out["tasks"], out["samples"]

    # held-out language modelling: the harness's rolling windows give our own per-document rule
    nll, size = document_nll(engine.model, engine.tok, texts(), engine.context_length)
    ours = nll.sum() / (math.log(2) * size.sum())
    assert figures["lmforge_val_text"]["items"] == len(texts())
    assert figures["lmforge_val_text"]["bits_per_byte"] == pytest.approx(ours, rel=1e-6)
    per_doc = -torch.tensor(samples["lmforge_val_text"]["loglikelihood"], dtype=torch.float64)
    assert per_doc.numpy() == pytest.approx(nll, rel=1e-6)  # each document, not only the total
    low, high = (
        figures["lmforge_val_text"]["bits_per_byte_ci_low"],
        figures["lmforge_val_text"]["bits_per_byte_ci_high"],
    )
    assert low < ours < high

    # preference multiple choice: chosen beats rejected by a direct forward pass's log-likelihood
    pairs = datasets.Dataset.from_parquet(str(tmp_path / DATA / "preference" / "val.parquet"))
    expected = []
    for pair in pairs:
        ctx = engine.chat_ids(pair["prompt"])
        chosen = direct_logprob(engine, ctx, engine.tok.encode(pair["chosen"]))
        rejected = direct_logprob(engine, ctx, engine.tok.encode(pair["rejected"]))
        expected.append(float(chosen >= rejected))
    assert samples["lmforge_preference"]["acc"] == expected

    # the verifiable task: the same greedy replies and grades as the evaluate stage's own code
    tasks = [d for d in verifiable.examples(12, seed=3)]
    questions = [verifiable.question_turn(d) for d in tasks]
    from lmforge.generation.sampling_params import SamplingParams

    replies = [g.text for g in engine.chat(questions, SamplingParams(max_new_tokens=6, temperature=0.0))]
    assert samples["lmforge_reverse"]["replies"] == replies
    graded = [
        float(verifiable.is_correct(verifiable.question_of(q[-1]["content"]), r))
        for q, r in zip(questions, replies)
    ]
    assert samples["lmforge_reverse"]["exact_match"] == graded
    assert figures["lmforge_reverse"]["items"] == 12


def test_a_continuation_longer_than_the_window_is_scored_in_windows(engine):
    """Each token of a long continuation is predicted from up to the window's length of tokens
    before it: the same sum as our own per-document rule (document_nll) on the whole sequence."""
    from types import SimpleNamespace

    from lmforge.harness.lm import LmforgeLM

    lm = LmforgeLM(engine)
    long = " ".join(WORDS * 4)
    (scored,) = lm.loglikelihood([SimpleNamespace(args=("", long))])  # context "": <|bos|> alone
    nll, _ = document_nll(engine.model, engine.tok, [long], engine.context_length)
    assert len(engine.tok.encode(long)) > 2 * engine.context_length
    assert scored[0] == pytest.approx(-nll[0], rel=1e-6)
    (short,) = lm.loglikelihood([SimpleNamespace(args=("the quick", " brown"))])
    expected = direct_logprob(engine, engine.prompt_ids("the quick"), engine.tok.encode(" brown"))
    assert short[0] == pytest.approx(expected, abs=1e-5)


def test_a_missing_split_is_named(engine, tmp_path):
    with pytest.raises(FileNotFoundError, match="text/val.parquet"):
        evaluate(engine, tmp_path, data=DATA, tasks=["lmforge_val_text"])


# --------------------------------------------------------------------------- through the service

# The test model's context is 64 and a scored prompt leaves room for one new token, so the API client
# gets max_length 63. Its rolling windows then score 61 tokens each (lm_eval 0.4.13's TemplateAPI
# builds windows of max_length - 1 and cuts the scored prompt to max_length); the in-process run
# reads the same windows as max_length 61.
SERVED_MAX_LENGTH = 63


def lm_eval_cli(model: str, model_args: str, tasks: str, root: Path, out: Path) -> dict:
    """The harness's own CLI on the bundled task configs, as the README shows; its results and
    samples (per task, in item order; the log files keep numbers as strings)."""
    cmd = [
        str(BIN / "lm_eval"),
        "--model", model,
        "--model_args", model_args,
        "--tasks", tasks,
        "--include_path", str(TASKS_DIR),
        "--metadata", json.dumps({"root": str(root), "data": DATA}),
        "--apply_chat_template",
        "--gen_kwargs", "max_gen_toks=6",
        "--output_path", str(out),
        "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    samples = {}
    for task in tasks.split(","):
        (file,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted(
            (json.loads(x) for x in file.read_text().splitlines()), key=lambda r: r["doc_id"]
        )
    return {"results": json.loads(results_file.read_text())["results"], "samples": samples}


@pytest.mark.slow
def test_the_tasks_score_the_same_in_process_and_through_the_service(text_registry, text_server, tmp_path):
    """The bundled tasks against the running service with the harness's own clients, as the README
    shows: the verifiable task by `local-chat-completions` gives the in-process run's replies item
    for item; preference choices and held-out documents by `local-completions` (prompts scored with
    `echo`, our exported tokenizer) give its log-likelihoods."""
    registry, server = text_registry, text_server
    root = tmp_path / "project"
    held_out(root, texts())
    model_dir = registry["root"] / "model"
    local = evaluate(
        ChatEngine.from_dir(model_dir), root, data=DATA, max_gen_toks=6, max_length=SERVED_MAX_LENGTH - 2
    )

    chat = lm_eval_cli(
        "local-chat-completions",
        f"base_url={server}/v1/chat/completions,model=lmforge-chat,num_concurrent=1,max_retries=1",
        "lmforge_reverse",
        root,
        tmp_path / "chat",
    )
    served = [r["resps"][0][0] for r in chat["samples"]["lmforge_reverse"]]
    assert len(served) == 12 and any(served), served  # real replies, not empty ones
    assert served == local["samples"]["lmforge_reverse"]["replies"]
    exact = chat["results"]["lmforge_reverse"]["exact_match,none"]
    assert exact == pytest.approx(local["tasks"]["lmforge_reverse"]["exact_match"], abs=1e-6)

    hf = tmp_path / "hf"
    subprocess.run(
        [str(BIN / "lmforge"), "export", "--model-dir", str(model_dir), "--out", str(hf)],
        check=True,
        cwd=REPO,
    )
    scored = lm_eval_cli(
        "local-completions",
        f"base_url={server}/v1/completions,model=lmforge-chat,num_concurrent=1,max_retries=1,"
        f"tokenizer_backend=huggingface,tokenizer={hf},max_length={SERVED_MAX_LENGTH}",
        "lmforge_preference,lmforge_val_text",
        root,
        tmp_path / "completions",
    )
    choices = [[float(c[0][0]) for c in r["resps"]] for r in scored["samples"]["lmforge_preference"]]
    mine = local["samples"]["lmforge_preference"]["loglikelihoods"]
    assert len(choices) == 9
    for theirs, ours in zip(choices, mine, strict=True):
        assert theirs == pytest.approx(ours, abs=1e-3)
    documents = [float(r["resps"][0][0]) for r in scored["samples"]["lmforge_val_text"]]
    assert documents == pytest.approx(local["samples"]["lmforge_val_text"]["loglikelihood"], rel=1e-6)
    bpb = scored["results"]["lmforge_val_text"]["bits_per_byte,none"]
    assert bpb == pytest.approx(local["tasks"]["lmforge_val_text"]["bits_per_byte"], rel=1e-6)


@pytest.fixture(scope="module")
def text_registry(tmp_path_factory) -> dict:
    """A registered tiny model whose greedy replies are text (the service tests' model replies with
    special tokens only, which would make "the same replies" an empty claim)."""
    root = tmp_path_factory.mktemp("harness-serve")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    return {
        **run_self(tracking_uri, "publish", str(root), "text-replies"),
        "root": root,
        "tracking_uri": tracking_uri,
    }


@pytest.fixture(scope="module")
def text_server(text_registry):
    with running_server(text_registry, "harness") as url:
        yield url


def test_gsm8k_is_graded_by_its_final_number(engine):
    from lmforge.harness.tasks.utils import final_number, gsm8k, gsm8k_results

    assert final_number("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == "18"
    assert final_number("#### 1,000") == "1000" and final_number("so 3.0 it is") == "3"
    assert final_number("first 4 then 5 and finally -7.5") == "-7.5"
    assert final_number("no number") is None
    assert gsm8k_results({"answer": "18"}, ["9 + 9 = 18 eggs"]) == {"exact_match": 1.0}
    assert gsm8k_results({"answer": "18"}, ["#### 19"]) == {"exact_match": 0.0}
    test = gsm8k(root=str(REPO))["test"]  # the bundled split: every reference has its final number
    assert len(test) == 1319 and all(a.lstrip("-").replace(".", "").isdigit() for a in test["answer"])
    # The task runs offline on the bundled data (a tiny model scores 0, which says nothing).
    out = evaluate(engine, REPO, tasks=["lmforge_gsm8k"], limit=3)
    assert (
        out["tasks"]["lmforge_gsm8k"]["items"] == 3 and len(out["samples"]["lmforge_gsm8k"]["replies"]) == 3
    )
