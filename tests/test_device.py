"""Device discipline without a GPU: every helper that runs a model must put its batches on the model's device.

The models here live on PyTorch's ``meta`` device (shapes, no data). That alone is not a reliable
check: some meta kernels (embedding, gather, indexing) silently accept a CPU argument, and nothing
data-dependent (``.item()``, ``.tolist()``) can run on meta. So the helpers run under
:func:`device_discipline`, which

* fails every aten op whose tensor arguments sit on more than one device. A 0-dim CPU tensor is a
  scalar and may mix, as PyTorch allows; ``.to(device)`` is an explicit transfer and is allowed. An
  implicit copy (``device_tensor[i] = cpu_tensor``) fails: it runs on CUDA, but hides a host-to-device
  copy per call; such tensors should be created on the device;
* fails every call that pairs a ``torch.Generator`` with tensors on another device;
* answers host read-backs of meta tensors (``.item()``, ``.tolist()``, ``.cpu()``) with a constant,
  so decode loops and loss sums run to the end instead of stopping at the first read-back.

On a CUDA machine the same mistakes raise "Expected all tensors to be on the same device".
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import tiny_gpt
from lmforge.evaluation import assistant_loss, full_val_loss, preference_accuracy, reply_stats
from lmforge.generation.chat import ChatEngine, default_device
from lmforge.generation.driver import generate
from lmforge.generation.sampling_params import SamplingParams
from lmforge.heads import ScalarHeadModel
from lmforge.model import GPT
from lmforge.model_folder import save_model_dir
from lmforge.tokenizer import SPECIAL_TOKENS, ChatTokenizer, train_bpe
from lmforge.training.chat_data import encode_pairs, encode_sft
from lmforge.training.data import ShardInfo
from lmforge.training.rl_losses import entropy_from_logits, sequence_logprobs, token_logprobs
from lmforge.training.rollouts import RewardModelFn, evaluate_policy, right_pad, rollout, stack_rollout

aten = torch.ops.aten
META = torch.device("meta")
# What a meta tensor "reads back" as: the first ordinary token id, so read-back tokens never stop a
# reply early (ids below it are <|bos|>, <|eos|>, <|end|>, ...) and every decode step runs.
READBACK = len(SPECIAL_TOKENS)
BLOCK = 64


class DeviceMismatchError(AssertionError):
    pass


def _placed(x: object) -> bool:
    """Tensors whose device matters; a 0-dim CPU tensor is a wrapped scalar and may mix (as in PyTorch)."""
    return isinstance(x, torch.Tensor) and not (x.device.type == "cpu" and x.dim() == 0)


def _target_device(args: tuple, kwargs: dict) -> torch.device | None:
    """Where an aten.to / aten._to_copy call copies to (None: it stays put)."""
    to = kwargs.get("device")
    for a in args[1:]:
        to = to or (a.device if isinstance(a, torch.Tensor) else a if isinstance(a, torch.device) else None)
    return None if to is None else torch.device(to)


class _MixedDevices(TorchDispatchMode):
    COPIES = {aten._to_copy, aten.to}  # explicit .to(device): the only way between devices
    READBACKS = {aten._local_scalar_dense, aten.item, aten.is_nonzero}  # .item(), bool(), int(), float()

    def __init__(self, readback: int) -> None:
        super().__init__()
        self.readback = readback
        self.ops: Counter[str] = Counter()  # ops run, by device type of their inputs
        self.errors: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        packet = func.overloadpacket
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            to = _target_device(args, kwargs) if packet in self.COPIES else None
            if packet in self.READBACKS or to not in (None, META):
                # A host read-back (.item(), .tolist(), .cpu()) of data that does not exist: run the
                # op on a CPU stand-in holding `readback` everywhere.
                stand_in = torch.full(args[0].shape, self.readback, dtype=args[0].dtype)
                return func(stand_in, *args[1:], **kwargs)
        devices = {t.device for t in tensors if _placed(t)}
        if packet not in self.COPIES and len(devices) > 1:
            self.errors.append(f"{func}: {sorted(map(str, devices))}")
            raise DeviceMismatchError(f"{func} mixes devices {sorted(map(str, devices))}")
        for d in devices:
            self.ops[d.type] += 1
        return func(*args, **kwargs)


class _GeneratorDevices(TorchFunctionMode):
    """Generators are unwrapped to plain CPU objects below the dispatcher, so check them up here."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__()
        self.errors = errors

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        gens = {g.device for g in leaves if isinstance(g, _TorchGenerator)}
        if gens:
            devices = gens | {t.device for t in leaves if _placed(t)}
            if len(devices) > 1:
                self.errors.append(
                    f"{func}: generator on {sorted(map(str, gens))}, {sorted(map(str, devices))}"
                )
                raise DeviceMismatchError(f"{func}: generator and tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


_TorchGenerator = torch.Generator


class _MetaGenerator(_TorchGenerator):
    """Stands in for ``torch.Generator(device="meta")``, which torch cannot make: CPU state, meta device."""

    def __new__(cls) -> _MetaGenerator:
        return super().__new__(cls, device="cpu")

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return META


def _generator(device: torch.device | str | None = None) -> torch.Generator:
    if device is not None and torch.device(device) == META:
        return _MetaGenerator()
    return _TorchGenerator() if device is None else _TorchGenerator(device=device)


@contextlib.contextmanager
def device_discipline(readback: int = READBACK) -> Iterator[_MixedDevices]:
    """Run the body under the checks described in the module docstring; yields the op tally."""
    mode = _MixedDevices(readback)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "Generator", _generator)
        with _GeneratorDevices(mode.errors), mode:
            yield mode
    assert not mode.errors, mode.errors


@pytest.fixture
def checked() -> Iterator[_MixedDevices]:
    """The test body runs under device_discipline. Its asserts on read-back values (READBACK) show
    that the work really ran on the meta device; a mismatch swallowed by the body still fails here."""
    with device_discipline() as mode:
        yield mode


# ---------------------------------------------------------------------------- models and data


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    texts = [
        f"would you like {t}? yes thank you. no go away." for t in ("tea", "cake", "a walk", "bread")
    ] * 10
    return ChatTokenizer(train_bpe(texts, vocab_size=300))


def meta_gpt(vocab: int) -> GPT:
    return tiny_gpt(vocab, block_size=BLOCK).to(META).eval()


def meta_rm(vocab: int) -> ScalarHeadModel:
    return ScalarHeadModel(tiny_gpt(vocab, seed=1, block_size=BLOCK)).to(META).eval()


def conversations() -> list[list[dict]]:
    return [
        [
            {"role": "user", "content": f"would you like {t}?"},
            {"role": "assistant", "content": "yes thank you"},
        ]
        for t in ("tea", "cake", "a walk")
    ]


def prompts_only() -> list[list[dict]]:
    return [c[:1] for c in conversations()]


# ---------------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    "bug",
    [
        lambda w: F.embedding(torch.tensor([[1, 2]]), w),  # batch left on the CPU
        lambda w: w.gather(1, torch.zeros(4, 1, dtype=torch.long)),
        lambda w: w[torch.tensor([0, 1])] + torch.ones(2, 8),
        lambda w: torch.multinomial(w.softmax(-1), 1, generator=_TorchGenerator()),
        lambda w: w[0].copy_(torch.ones(8)),  # implicit host-to-device copy
        lambda w: w.__setitem__((slice(None), 0), torch.ones(10)),
    ],
    ids=["embedding", "gather", "index+add", "cpu-generator", "copy_", "setitem"],
)
def test_checker_fails_mixed_devices_meta_lets_through(bug) -> None:
    weight = torch.zeros(10, 8, device=META)
    with pytest.raises(DeviceMismatchError), device_discipline() as mode:
        bug(weight)
    assert mode.errors


def test_checker_allows_scalars_transfers_and_reads_back() -> None:
    w = torch.zeros(4, 8, device=META)
    with device_discipline(readback=3) as mode:
        assert (w * torch.tensor(2.0)).is_meta  # a 0-dim CPU tensor is a scalar
        assert torch.tensor([1, 2]).to(META).is_meta and torch.ones(8).to(w).is_meta
        w[:, 0] = 1.0  # a Python scalar
        assert w.sum().item() == 3.0 and bool(w.sum()) and int(w[0, 0]) == 3
        assert w[:, 0].tolist() == [3.0] * 4 and w.cpu().shape == (4, 8)
        assert torch.multinomial(w.softmax(-1), 1, generator=torch.Generator(device=META)).is_meta
    assert mode.ops["meta"] > 0


# ---------------------------------------------------------------------------- evaluation


def test_full_val_loss_on_model_device(tmp_path: Path, checked) -> None:
    vocab, n = 40, 5 * BLOCK + 1  # five full windows
    (np.arange(n) % vocab).astype(np.uint16).tofile(tmp_path / "val.bin")
    info = {"dtype": "uint16", "vocab_size": vocab, "tokens": {"val": n}, "bytes": {"val": n}}
    (tmp_path / "shards.json").write_text(json.dumps({**info, "bos_id": 0, "eos_id": 1}))
    loss = full_val_loss(meta_gpt(vocab), tmp_path, ShardInfo.load(tmp_path), BLOCK, batch_size=2)
    # Each window's summed loss comes to the host (one copy per batch of windows): READBACK apiece.
    assert loss == pytest.approx(5 * READBACK / (5 * BLOCK))


def test_assistant_loss_on_model_device(tok: ChatTokenizer, checked) -> None:
    examples, _ = encode_sft(tok, conversations(), BLOCK)
    assert assistant_loss(meta_gpt(tok.vocab_size), examples, BLOCK, tok.pad_id, batch_size=2) == 1.0


def test_preference_accuracy_on_model_device(tok: ChatTokenizer, checked) -> None:
    pairs = [{"prompt": c[:1], "chosen": "yes thank you", "rejected": "no go away"} for c in conversations()]
    encoded, _ = encode_pairs(tok, pairs, BLOCK)
    out = preference_accuracy(meta_rm(tok.vocab_size), encoded, tok.pad_id, batch_size=2)
    assert set(out) == {"accuracy", "margin"}


def test_scalar_head_reads_mask_on_the_models_device(checked) -> None:
    # Like GPT, the head accepts a mask from anywhere and uses it on the model's device.
    rm = meta_rm(32)
    ids, mask = right_pad([[8, 9, 10, 12], [11, 13, 14]], pad_id=2)
    assert rm(ids.to(META), mask).shape == (2,)
    assert rm(ids.to(META), mask.to(META)).is_meta and rm.values(ids.to(META), mask).shape == (2, 4)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_reply_stats_and_reward_scores_on_model_device(tok: ChatTokenizer, checked, temperature) -> None:
    engine = ChatEngine(meta_gpt(tok.vocab_size), tok)
    rm = meta_rm(tok.vocab_size)
    stats = reply_stats(
        engine, prompts_only(), max_new_tokens=4, temperature=temperature, rm=rm, batch_size=2
    )
    assert stats["mean_length"] == 4 and stats["mean_reward"] == READBACK


# ---------------------------------------------------------------------------- sampling


PROMPTS = [[8, 9, 10, 11, 12], [13, 14], [15, 16, 17]]  # different lengths: the masked, left-padded path
SAMPLING = [
    SamplingParams(max_new_tokens=5, temperature=0.0),
    SamplingParams(max_new_tokens=5, temperature=0.0, repetition_penalty=1.3, logprobs=2),
    SamplingParams(max_new_tokens=5, temperature=0.7, seed=3),
    SamplingParams(max_new_tokens=5, temperature=1.0, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    SamplingParams(max_new_tokens=5, temperature=0.9, seed=0, logprobs=3, stop_strings=("zz",)),
]
SAMPLING_IDS = ["greedy", "greedy-penalty-logprobs", "seeded", "filters-unseeded", "stop-strings-logprobs"]


def _decode(ids: list[int]) -> str:
    return " ".join(map(str, ids))


@pytest.mark.parametrize("params", SAMPLING, ids=SAMPLING_IDS)
def test_generate_on_model_device(params: SamplingParams, checked) -> None:
    gens = generate(meta_gpt(32), PROMPTS, params, decode=_decode, pad_id=2)
    assert [g.token_ids for g in gens] == [[READBACK] * 5] * 3  # every decode step ran
    assert all(g.finish_reason == "length" for g in gens)


# ---------------------------------------------------------------------------- the engine


def test_engine_uses_the_models_device(tok: ChatTokenizer, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU "exists": still no implicit move
    model = tiny_gpt(tok.vocab_size, block_size=BLOCK)
    assert ChatEngine(model, tok).device == torch.device("cpu") and model.tok_emb.weight.device.type == "cpu"
    assert ChatEngine(meta_gpt(tok.vocab_size), tok).device == META
    engine = ChatEngine(model, tok, device="meta")  # an explicit device moves the model
    assert engine.device == META and engine.model is model and model.tok_emb.weight.is_meta
    monkeypatch.delenv("LMFORGE_DEVICE", raising=False)
    assert default_device() == torch.device("cuda")
    monkeypatch.setenv("LMFORGE_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")


def test_engine_from_dir_with_device(tok: ChatTokenizer, tmp_path: Path) -> None:
    model = tiny_gpt(tok.vocab_size, block_size=BLOCK)
    tok.save(tmp_path / "tok")
    save_model_dir(model, model.config, tmp_path / "tok", tmp_path / "model")
    assert ChatEngine.from_dir(tmp_path / "model").device == torch.device("cpu")
    assert ChatEngine.from_dir(tmp_path / "model", device="meta").device == META


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_generation_on_model_device(tok: ChatTokenizer, checked, temperature) -> None:
    engine = ChatEngine(tiny_gpt(tok.vocab_size, block_size=BLOCK), tok, device=META)
    params = SamplingParams(max_new_tokens=3, temperature=temperature, seed=1, logprobs=1)
    assert [len(g.token_ids) for g in engine.chat(prompts_only(), params)] == [3, 3, 3]
    assert [len(g.token_ids) for g in engine.complete(["would you", "tea"], params)] == [3, 3]


# ---------------------------------------------------------------------------- RL helpers


def test_rollout_and_reward_fn_on_model_device(tok: ChatTokenizer, checked) -> None:
    policy, rm = meta_gpt(tok.vocab_size), meta_rm(tok.vocab_size)
    prompts = [tok.render_chat(p, add_generation_prompt=True).ids for p in prompts_only()]
    params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=0, stop_token_ids=(tok.end_id,))
    replies = rollout(policy, prompts, params, tok.pad_id)
    assert replies == [[READBACK] * 3] * 3
    score = RewardModelFn(rm, tok.end_id, tok.pad_id)
    assert score(prompts, replies).is_meta
    out = evaluate_policy(policy, prompts, score, params, pad_id=tok.pad_id, batch_size=2)
    assert out == {"mean_reward": READBACK, "mean_length": 3}


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu-rows", "device-rows"])
def test_sequence_logprobs_on_model_device(on_device: bool, checked) -> None:
    model = meta_gpt(32)
    prompts, replies = [[8, 9, 10], [11, 12]], [[13, 14], [15, 16, 17, 18]]
    # stages/rlhf builds its rows on the CPU; the RLHF module on its own device.
    ids, mask, response = stack_rollout(prompts, replies, pad_id=2, device=META if on_device else None)
    logp = sequence_logprobs(model, ids, mask, response, temperature=0.7)
    assert logp.is_meta and logp.shape == (2, 5)
    ids = ids.to(META)
    logits = model(ids)
    assert token_logprobs(logits, ids).shape == (2, 5) and entropy_from_logits(logits).shape == (2, 6)


# ---------------------------------------------------------------------------- the stages (issue 25)


def test_no_stage_moves_a_model_to_the_cpu() -> None:
    """A stage evaluates on the device that trained (before: every training stage moved its model to
    the CPU for the full held-out loss, bits/byte, samples and before/after figures, hours on a real
    corpus). The one way a stage places a model for evaluation is `fitting.for_evaluation`."""
    import ast

    stages = Path(__file__).resolve().parents[1] / "src" / "lmforge" / "stages"
    moves = []
    for path in sorted(stages.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            to_cpu = node.func.attr == "to" and any(
                isinstance(a, ast.Constant) and str(a.value).startswith("cpu") for a in node.args
            )
            if to_cpu or node.func.attr == "cpu":
                moves.append(f"{path.name}:{node.lineno}")
    assert not moves, f"models moved to the CPU in stages: {moves}"


def test_for_evaluation_places_casts_and_uncompiles() -> None:
    from lmforge.stages.fitting import for_evaluation

    model = tiny_gpt(32, block_size=BLOCK).to(torch.bfloat16).train()
    model.compile()  # as CausalLMModule(compile_model=True) leaves it
    assert model._compiled_call_impl is not None
    out = for_evaluation(model, META)
    assert out is model and not model.training
    assert all(p.is_meta and p.dtype == torch.float32 for p in model.parameters())
    assert all(m._compiled_call_impl is None for m in model.modules())  # eager: shapes vary in evaluation


def test_training_device_is_this_process_gpu(monkeypatch) -> None:
    from lmforge.training import TrainerConfig
    from lmforge.training.trainer import training_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert training_device(TrainerConfig(max_steps=1, accelerator="gpu")) == torch.device("cuda", 3)
    assert training_device(TrainerConfig(max_steps=1, accelerator="cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device(TrainerConfig(max_steps=1, accelerator="auto")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK")
    assert training_device(TrainerConfig(max_steps=1, accelerator="auto")) == torch.device("cuda", 0)


def test_serving_dtype_is_bf16_on_cuda_fp32_on_cpu(monkeypatch) -> None:
    from lmforge.generation.chat import serving_dtype

    monkeypatch.delenv("LMFORGE_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert serving_dtype("cuda:1") == torch.bfloat16
    assert serving_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # pre-Ampere
    assert serving_dtype("cuda") == torch.float32
    monkeypatch.setenv("LMFORGE_DTYPE", "float16")
    assert serving_dtype("cuda") == torch.float16
    monkeypatch.setenv("LMFORGE_DTYPE", "half")
    with pytest.raises(
        ValueError, match=r"\$LMFORGE_DTYPE='half': expected one of float32, bfloat16, float16"
    ):
        serving_dtype("cpu")


def test_engine_from_dir_loads_in_the_serving_dtype(tok: ChatTokenizer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LMFORGE_DTYPE", raising=False)
    model = tiny_gpt(tok.vocab_size, block_size=BLOCK)
    tok.save(tmp_path / "tok")
    save_model_dir(model, model.config, tmp_path / "tok", tmp_path / "model")
    assert ChatEngine.from_dir(tmp_path / "model").dtype == torch.float32
    engine = ChatEngine.from_dir(tmp_path / "model", device="meta", dtype=torch.bfloat16)
    assert (
        engine.dtype == torch.bfloat16 and engine.model.new_slot_cache(2, 8).keys[0].dtype == torch.bfloat16
    )


def test_tf32_matmuls_on_cuda_only(monkeypatch) -> None:
    """Issue 25: TF32 was never set for the fp32 paths on CUDA; the CPU's setting must not move."""
    from lmforge.training import TrainerConfig
    from lmforge.training.trainer import use_matmul_precision

    set_to: list[str] = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", set_to.append)
    assert use_matmul_precision(TrainerConfig(max_steps=1, accelerator="cpu")) is None
    assert use_matmul_precision(TrainerConfig(max_steps=1, accelerator="gpu")) == "high"
    assert use_matmul_precision(TrainerConfig(max_steps=1, accelerator="cuda", matmul_precision="highest"))
    assert set_to == ["high", "highest"]
