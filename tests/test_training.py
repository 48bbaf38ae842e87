"""Tests for the shared training core (lmforge.training)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from conftest import cpu_trainer_config, tiny_gpt
from lmforge.model_folder import export_weights, load_weights
from lmforge.training import (
    CausalLMModule,
    OptimConfig,
    ShardInfo,
    TokenShardDataModule,
    TrainerConfig,
    fit,
    load_shard,
    param_groups,
    warmup_cosine,
)
from lmforge.training.data import RandomWindows, load_shards
from lmforge.training.optim import Chained, build_optimizer, muon_matrices, warmup_stable_decay

VOCAB, BLOCK = 64, 16


# `conftest.tiny_gpt` with a 16-token context and full multi-head attention.
SHAPE = {"vocab_size": VOCAB, "block_size": BLOCK, "n_kv_head": 4}


def write_shard(d: Path, train: np.ndarray, val: np.ndarray, dtype: str = "uint16") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    train.astype(dtype).tofile(d / "train.bin")
    val.astype(dtype).tofile(d / "val.bin")
    meta = {
        "dtype": dtype,
        "vocab_size": VOCAB,
        "tokens": {"train": len(train), "val": len(val)},
        "bytes": {"train": 2 * len(train), "val": 2 * len(val)},
        "bos_id": 0,
        "eos_id": 1,
    }
    (d / "shards.json").write_text(json.dumps(meta))
    return d


def random_shard(d: Path, n: int = 5000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_shard(d, rng.integers(0, VOCAB, n), rng.integers(0, VOCAB, n // 5))


def repetitive_shard(d: Path) -> Path:
    # A fixed period-12 pattern: next token is fully predictable from context.
    pattern = np.array([3, 17, 42, 5, 9, 60, 33, 8, 21, 50, 14, 2])
    return write_shard(d, np.tile(pattern, 500), np.tile(pattern, 50))


quiet_cfg = cpu_trainer_config  # test_reproducibility imports it from here


# ---- optim -----------------------------------------------------------------------


def test_param_groups_split_and_cover_every_param_once():
    model = tiny_gpt(**SHAPE)
    decay, no_decay = (g["params"] for g in param_groups(model, 0.1))
    decay_ids, no_decay_ids = {id(p) for p in decay}, {id(p) for p in no_decay}
    assert len(decay_ids) == len(decay) and len(no_decay_ids) == len(no_decay)
    assert not decay_ids & no_decay_ids
    unique = {id(p) for p in model.parameters()}
    assert decay_ids | no_decay_ids == unique and len(decay) + len(no_decay) == len(unique)
    for m in model.modules():
        if isinstance(m, nn.Embedding | nn.RMSNorm):
            assert all(id(p) in no_decay_ids for p in m.parameters(recurse=False))
        elif isinstance(m, nn.Linear) and not any(
            m.weight is e.weight for e in model.modules() if isinstance(e, nn.Embedding)
        ):
            assert id(m.weight) in decay_ids and m.weight.ndim == 2
    assert all(p.ndim >= 2 for p in decay)


def test_param_groups_tied_weight_counted_once_as_embedding():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 10, bias=False)  # registered before the embedding on purpose
            self.emb = nn.Embedding(10, 8)
            self.head.weight = self.emb.weight
            self.proj = nn.Linear(8, 8)
            self.norm = nn.RMSNorm(8)

    m = Tied()
    decay, no_decay = (g["params"] for g in param_groups(m, 0.1))
    assert [id(p) for p in decay] == [id(m.proj.weight)]
    assert sum(p is m.emb.weight for p in no_decay) == 1
    assert len(decay) + len(no_decay) == len(list(m.parameters())) == 4  # tied, proj.w, proj.b, norm


def test_warmup_cosine_values():
    cfg = OptimConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert warmup_cosine(0, cfg) == 0.0
    assert warmup_cosine(5, cfg) == pytest.approx(0.5)
    assert warmup_cosine(10, cfg) == pytest.approx(1.0)
    assert warmup_cosine(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert warmup_cosine(110, cfg) == pytest.approx(0.1)
    assert warmup_cosine(500, cfg) == pytest.approx(0.1)
    assert warmup_cosine(0, OptimConfig(warmup_steps=0, max_steps=10)) == pytest.approx(1.0)


def test_warmup_stable_decay_values():
    cfg = OptimConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="wsd", cooldown_frac=0.5)
    assert warmup_stable_decay(5, cfg) == pytest.approx(0.5)
    assert warmup_stable_decay(10, cfg) == warmup_stable_decay(55, cfg) == 1.0  # flat until the cooldown
    assert warmup_stable_decay(83, cfg) == pytest.approx(0.1 + 0.9 * 27 / 55)  # linear over the last 55
    assert warmup_stable_decay(110, cfg) == warmup_stable_decay(200, cfg) == pytest.approx(0.1)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_gpt(**SHAPE)
    opt, sched = build_optimizer(model, OptimConfig(optimizer="muon", muon_lr=0.05, lr=1e-3, warmup_steps=0))
    assert isinstance(opt, Chained)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    assert in_muon == sorted(
        n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")
    )
    assert [id(p) for p in muon_matrices(model)] == [id(p) for g in muon.param_groups for p in g["params"]]
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert "tok_emb.weight" in in_adamw and not in_adamw & set(in_muon)
    assert len(in_adamw) + len(in_muon) == len(names)  # every parameter once (the tied head is tok_emb)
    # One schedule drives both: the groups the scheduler sees are the children's own dicts.
    assert [g["lr"] for g in opt.param_groups] == [0.05, 1e-3]  # AdamW keeps only its no-decay group
    untied = tiny_gpt(**SHAPE, tie_embeddings=False)
    assert "lm_head.weight" not in {
        n for n, p in untied.named_parameters() if any(p is q for q in muon_matrices(untied))
    }


def test_chained_state_round_trips_and_refuses_another_optimizers_state():
    model = tiny_gpt(**SHAPE)
    opt, _ = build_optimizer(model, OptimConfig(optimizer="muon", warmup_steps=0))
    model(torch.randint(0, VOCAB, (2, 8))).sum().backward()
    opt.step()
    assert len(opt.state) == len(list(model.parameters()))
    copy, _ = build_optimizer(tiny_gpt(**SHAPE), OptimConfig(optimizer="muon", warmup_steps=0))
    copy.load_state_dict(opt.state_dict())
    assert str(copy.state_dict()) == str(opt.state_dict())
    adamw, _ = build_optimizer(model, OptimConfig(warmup_steps=0))
    with pytest.raises(ValueError, match="written with another optimizer"):
        copy.load_state_dict(adamw.state_dict())


@pytest.mark.parametrize(
    "make",
    [
        lambda: OptimConfig(lr=0),
        lambda: OptimConfig(warmup_steps=20, max_steps=10),
        lambda: OptimConfig(beta2=1.0),
        lambda: TrainerConfig(max_steps=0),
        lambda: TrainerConfig(max_steps=10, strategy="horovod"),
        lambda: TrainerConfig(max_steps=10, precision="fp8"),
        lambda: TrainerConfig(max_steps=10, devices=0),
    ],
)
def test_config_validation(make):
    with pytest.raises(ValueError):
        make()


# ---- data ------------------------------------------------------------------------


def test_train_windows_deterministic_per_seed_and_rank(tmp_path):
    d = random_shard(tmp_path / "s")
    data = load_shard(d, "train")
    a, b = (RandomWindows(data, BLOCK, 4, seed=7, rank=0) for _ in range(2))
    for i in range(3):
        assert torch.equal(a.batch(i)["input_ids"], b.batch(i)["input_ids"])
    other_seed = RandomWindows(data, BLOCK, 4, seed=8, rank=0)
    other_rank = RandomWindows(data, BLOCK, 4, seed=7, rank=1, world=2)
    assert not torch.equal(a.batch(0)["input_ids"], other_seed.batch(0)["input_ids"])
    assert not torch.equal(a.batch(0)["input_ids"], other_rank.batch(0)["input_ids"])
    # Resumable: starting the stream at batch k replays batch k of the uninterrupted stream.
    resumed = next(iter(RandomWindows(data, BLOCK, 4, seed=7, rank=0, start_batch=5)))
    assert torch.equal(resumed["input_ids"], a.batch(5)["input_ids"])
    # Windows are real slices of the shard, labels shifted by one, int64.
    x, y = a.batch(0)["input_ids"], a.batch(0)["labels"]
    assert x.shape == y.shape == (4, BLOCK) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    arr = np.asarray(data, dtype=np.int64)
    first = x[0].numpy()
    assert any(np.array_equal(arr[s : s + BLOCK], first) for s in range(len(arr) - BLOCK))


def test_ddp_ranks_take_disjoint_interleaved_batches_of_one_global_stream(tmp_path):
    data = load_shard(random_shard(tmp_path / "s"), "train")
    single = RandomWindows(data, BLOCK, 4, seed=7)
    world, steps = 3, 4
    ranks = [RandomWindows(data, BLOCK, 4, seed=7, rank=r, world=world) for r in range(world)]
    taken: list[int] = []
    for r, ds in enumerate(ranks):
        stream = iter(ds)
        for i in range(steps):
            got = next(stream)["input_ids"]
            # Deterministic: a fresh instance and the global stream give the same batch.
            assert torch.equal(
                got, RandomWindows(data, BLOCK, 4, seed=7, rank=r, world=world).batch(i)["input_ids"]
            )
            assert torch.equal(got, single.global_batch(i * world + r)["input_ids"])
            taken.append(i * world + r)
    # Disjoint: no global batch goes to two ranks, and together they take the first world*steps,
    # exactly the batches one process accumulating `world` batches per step would take.
    assert sorted(taken) == list(range(world * steps))
    # A single process draws what it always has: batch i from default_rng([seed, 0, i]).
    starts = np.random.default_rng([7, 0, 5]).integers(0, len(data) - BLOCK, size=4)
    expected = np.stack([np.asarray(data[s : s + BLOCK], dtype=np.int64) for s in starts])
    assert np.array_equal(single.batch(5)["input_ids"].numpy(), expected)
    # Resuming rank 1 at its batch 2 continues its own interleaved stream.
    resumed = next(iter(RandomWindows(data, BLOCK, 4, seed=7, rank=1, world=world, start_batch=2)))
    assert torch.equal(resumed["input_ids"], single.global_batch(2 * world + 1)["input_ids"])
    with pytest.raises(ValueError, match="rank"):
        RandomWindows(data, BLOCK, 4, seed=7, rank=2, world=2)


def write_multi_shard(d: Path, train_parts: list[np.ndarray], val_parts: list[np.ndarray]) -> Path:
    """A shard directory whose splits span several files, indexed in the sidecar."""
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, parts in (("train", train_parts), ("val", val_parts)):
        files[split] = []
        for k, part in enumerate(parts):
            name = f"{split}-{k:05d}.bin"
            part.astype("uint16").tofile(d / name)
            files[split].append({"name": name, "tokens": len(part), "bytes": 3 * len(part), "documents": 1})
    train, val = np.concatenate(train_parts), np.concatenate(val_parts)
    meta = {
        "dtype": "uint16",
        "vocab_size": VOCAB,
        "tokens": {"train": len(train), "val": len(val)},
        "bytes": {"train": 3 * len(train), "val": 3 * len(val)},
        "bos_id": 0,
        "eos_id": 1,
        "files": files,
    }
    (d / "shards.json").write_text(json.dumps(meta))
    return d


def test_multi_file_shards_read_as_one_stream(tmp_path):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, VOCAB, 3000), rng.integers(0, VOCAB, 700)
    cuts = [0, 5, 1000, 1003, 2990, 3000]  # files of 5, 995, 3, 1987 and 10 tokens
    multi = write_multi_shard(
        tmp_path / "multi",
        [train[a:b] for a, b in zip(cuts, cuts[1:])],
        [val[:100], val[100:101], val[101:]],
    )
    one = write_shard(tmp_path / "one", train, val)
    info = ShardInfo.load(multi)
    assert [f.tokens for f in info.split_files("train")] == [5, 995, 3, 1987, 10]
    assert info.tokens_per_byte("val") == pytest.approx(1 / 3)
    stream = load_shard(multi, "train")
    assert len(stream) == len(train) and np.array_equal(np.asarray(stream), train)
    # A slice across file boundaries is the concatenated stream's slice; an int index too.
    assert np.array_equal(stream[990:1010], train[990:1010]) and stream[1001] == train[1001]
    assert np.array_equal(stream[2980:], train[2980:]) and stream[-1] == train[-1]
    assert len(load_shards(multi, "train")) == 5
    # Training and validation windows are those of the same tokens in one file.
    a = TokenShardDataModule(multi, block_size=BLOCK, batch_size=4, seed=3, val_batches=5)
    b = TokenShardDataModule(one, block_size=BLOCK, batch_size=4, seed=3, val_batches=5)
    ta, tb = a.train_dataset(), b.train_dataset()
    for i in range(20):
        assert torch.equal(ta.batch(i)["input_ids"], tb.batch(i)["input_ids"])
        assert torch.equal(ta.batch(i)["labels"], tb.batch(i)["labels"])
    va, vb = list(a.val_dataloader()), list(b.val_dataloader())
    assert len(va) == len(vb) == 5
    for u, v in zip(va, vb, strict=True):
        assert torch.equal(u["input_ids"], v["input_ids"]) and torch.equal(u["labels"], v["labels"])
    assert len(a.val_dataset()) == len(b.val_dataset())
    # The index is checked: a missing file, a wrong size, counts that do not add up, a path.
    meta = json.loads((multi / "shards.json").read_text())
    (multi / "train-00002.bin").rename(multi / "moved.bin")
    with pytest.raises(FileNotFoundError, match="train-00002.bin"):
        load_shard(multi, "train")
    (multi / "moved.bin").write_bytes(b"\0" * 4)
    (multi / "moved.bin").rename(multi / "train-00002.bin")
    with pytest.raises(ValueError, match="wrong dtype or truncated"):
        load_shard(multi, "train")
    bad = {**meta, "files": {**meta["files"], "val": meta["files"]["val"][:1]}}
    (multi / "shards.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="do not add up"):
        ShardInfo.load(multi)
    bad = {**meta, "files": {**meta["files"], "val": [{"name": "../val.bin", "tokens": 700}]}}
    (multi / "shards.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"\.bin names"):
        ShardInfo.load(multi)


def test_val_windows_fixed_and_consecutive(tmp_path):
    d = random_shard(tmp_path / "s")
    dm = TokenShardDataModule(d, block_size=BLOCK, batch_size=4, seed=0, val_batches=3)
    b1 = list(dm.val_dataloader())
    b2 = list(dm.val_dataloader())
    assert len(b1) == 3
    for u, v in zip(b1, b2, strict=True):
        assert torch.equal(u["input_ids"], v["input_ids"]) and torch.equal(u["labels"], v["labels"])
    val = np.fromfile(d / "val.bin", dtype=np.uint16).astype(np.int64)
    assert np.array_equal(b1[0]["input_ids"][1].numpy(), val[BLOCK : 2 * BLOCK])
    assert np.array_equal(b1[0]["labels"][1].numpy(), val[BLOCK + 1 : 2 * BLOCK + 1])
    # Asking for more windows than exist yields all of them.
    dm_all = TokenShardDataModule(d, block_size=BLOCK, batch_size=4, seed=0, val_batches=10_000)
    assert len(dm_all.val_dataset()) == (len(val) - 1) // BLOCK
    assert ShardInfo.load(d).tokens_per_byte("val") == pytest.approx(0.5)


def test_sidecar_validation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="shards.json"):
        ShardInfo.load(tmp_path)
    d = random_shard(tmp_path / "s")
    meta = json.loads((d / "shards.json").read_text())
    (d / "shards.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    with pytest.raises(ValueError, match="wrong dtype or truncated"):
        load_shard(d, "train")
    (d / "shards.json").write_text(json.dumps({**meta, "dtype": "int8"}))
    with pytest.raises(ValueError, match="dtype must be one of"):
        ShardInfo.load(d)
    (d / "shards.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "tokens"}))
    with pytest.raises(ValueError, match="malformed"):
        ShardInfo.load(d)
    (d / "shards.json").write_text(json.dumps(meta))
    (d / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match="val.bin"):
        load_shard(d, "val")


# ---- module ----------------------------------------------------------------------


def test_causal_lm_loss_ignores_masked_labels():
    module = CausalLMModule(tiny_gpt(**SHAPE), OptimConfig(), val_tokens_per_byte=0.25)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (3, BLOCK), generator=g)
    y = torch.randint(0, VOCAB, (3, BLOCK), generator=g)
    y[0, :10] = -100
    y[2, 5:] = -100
    loss, _ = module.compute_loss({"input_ids": x, "labels": y})
    logp = F.log_softmax(module.model(x).float(), dim=-1)
    keep = y != -100
    manual = -logp[keep].gather(-1, y[keep].unsqueeze(-1)).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # Changing a masked label must not change the loss.
    y2 = y.clone()
    y2[0, 0] = 7
    y2[0, 0] = -100
    assert module.compute_loss({"input_ids": x, "labels": y2})[0].item() == pytest.approx(loss.item())
    all_masked = torch.full_like(y, -100)
    assert module.compute_loss({"input_ids": x, "labels": all_masked})[0].item() == 0.0
    bpb = module.val_metrics(loss, {"input_ids": x, "labels": y})["bits_per_byte"]
    assert bpb.item() == pytest.approx(loss.item() / math.log(2) * 0.25)
    assert "model_config" in module.hparams and module.hparams["optim"]["lr"] == 3e-4


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
def test_tiny_model_learns_repetitive_shard(tmp_path):
    d = repetitive_shard(tmp_path / "s")
    L.seed_everything(0)
    module = CausalLMModule(
        tiny_gpt(**SHAPE), OptimConfig(lr=3e-3, warmup_steps=5, max_steps=60), val_tokens_per_byte=0.5
    )
    dm = TokenShardDataModule(d, block_size=BLOCK, batch_size=8, seed=0, val_batches=2)
    rec = LossRecorder()
    cfg = cpu_trainer_config(60, val_every_steps=30, val_batches=2, checkpoint_every_steps=30)
    trainer = fit(module, dm, cfg, resume=False, default_root_dir=tmp_path / "run", callbacks=[rec])
    assert trainer.global_step == 60 and len(rec.losses) == 60
    first, last = np.mean(rec.losses[:5]), np.mean(rec.losses[-5:])
    assert first > 3.0 and last < 0.4 * first, (first, last)
    m = trainer.callback_metrics
    assert {"val/loss", "val/bits_per_byte", "lr"} <= set(m)
    assert m["val/bits_per_byte"].item() == pytest.approx(m["val/loss"].item() / math.log(2) * 0.5, rel=1e-4)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    # safetensors export round-trips (tied embedding/lm_head stored once).
    path = export_weights(module.model, tmp_path / "w.safetensors")
    fresh = load_weights(tiny_gpt(seed=1, **SHAPE), path)
    for (k, a), b in zip(module.model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_matches_uninterrupted(tmp_path, optimizer):
    d = random_shard(tmp_path / "s")
    optim = OptimConfig(lr=1e-3, warmup_steps=4, max_steps=20, optimizer=optimizer)

    def run(root: Path, max_steps: int, resume: bool, steps_run: int) -> CausalLMModule:
        module = CausalLMModule(tiny_gpt(seed=0, **SHAPE), optim)
        rec = LossRecorder()
        dm = TokenShardDataModule(d, block_size=BLOCK, batch_size=4, seed=3, val_batches=1)
        cfg = cpu_trainer_config(
            max_steps,
            val_every_steps=5,
            val_batches=1,
            checkpoint_every_steps=10,
            deterministic=True,
            seed=5,
        )
        trainer = fit(module, dm, cfg, resume=resume, default_root_dir=root, callbacks=[rec])
        assert trainer.global_step == max_steps and len(rec.losses) == steps_run
        return module

    full = run(tmp_path / "a", 20, resume=False, steps_run=20)
    run(tmp_path / "b", 10, resume=False, steps_run=10)
    resumed = run(tmp_path / "b", 20, resume=True, steps_run=10)  # continues from step 10
    untouched = tiny_gpt(seed=0, **SHAPE).state_dict()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k  # bitwise on the CPU
        assert not torch.allclose(v, untouched[k]) or v.ndim == 1, k  # training actually moved weights


# ---- DDP -------------------------------------------------------------------------

DDP_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import pytorch_lightning as L
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from lmforge.model import GPT, GPTConfig
    from lmforge.training import CausalLMModule, OptimConfig, TokenShardDataModule, TrainerConfig
    from lmforge.model_folder import export_weights
    from lmforge.training import build_trainer

    STEPS, GLOBAL_B = 3, 8


    class Repeat(IterableDataset):
        def __init__(self, batch):
            self.batch = batch

        def __iter__(self):
            while True:
                yield self.batch


    class FixedGlobalBatch(L.LightningDataModule):
        # Rank r trains on rows [r*b, (r+1)*b) of one fixed global batch, every step.
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 64, (GLOBAL_B, 16), generator=g)
            y = torch.randint(0, 64, (GLOBAL_B, 16), generator=g)
            rank, world = self.trainer.global_rank, self.trainer.world_size
            b = GLOBAL_B // world
            part = {"input_ids": x[rank * b:(rank + 1) * b], "labels": y[rank * b:(rank + 1) * b]}
            return DataLoader(Repeat(part), batch_size=None)


    def main(out: str, shard_dir: str, devices: int) -> None:
        L.seed_everything(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32))
        module = CausalLMModule(model, OptimConfig(lr=1e-3, warmup_steps=0, max_steps=STEPS))
        cfg = TrainerConfig(max_steps=STEPS, accelerator="cpu", devices=devices,
                            strategy="ddp" if devices > 1 else "auto", val_every_steps=0,
                            checkpoint_every_steps=0, enable_progress_bar=False)
        trainer = build_trainer(cfg, default_root_dir=out)
        trainer.fit(module, datamodule=FixedGlobalBatch())
        # Each rank also reports its first TokenShardDataModule batch (must differ by rank).
        dm = TokenShardDataModule(shard_dir, block_size=16, batch_size=4, seed=0)
        dm.trainer = trainer
        np.save(Path(out) / f"windows_rank{trainer.global_rank}.npy",
                dm.train_dataset().batch(0)["input_ids"].numpy())
        if trainer.is_global_zero:
            export_weights(module.model, Path(out) / "weights.safetensors")


    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    """
)


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    shard = random_shard(tmp_path / "s")
    ddp_out, ref_out = tmp_path / "ddp", tmp_path / "ref"
    ddp_out.mkdir()
    ref_out.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(ddp_out), str(shard), "2"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Single-process reference on the full global batch, in this process.
    spec = importlib.util.spec_from_file_location("ddp_worker", script)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    worker.main(str(ref_out), str(shard), 1)

    ddp_model, ref_model = tiny_gpt(seed=1, **SHAPE), tiny_gpt(seed=2, **SHAPE)
    load_weights(ddp_model, ddp_out / "weights.safetensors")
    load_weights(ref_model, ref_out / "weights.safetensors")
    init = tiny_gpt(seed=0, **SHAPE).state_dict()
    moved = False
    for k, v in ref_model.state_dict().items():
        assert torch.allclose(ddp_model.state_dict()[k], v, atol=2e-5, rtol=1e-4), k
        moved |= not torch.allclose(v, init[k])
    assert moved
    w0, w1 = np.load(ddp_out / "windows_rank0.npy"), np.load(ddp_out / "windows_rank1.npy")
    assert w0.shape == w1.shape == (4, BLOCK) and not np.array_equal(w0, w1)
    # The ranks took global batches 0 and 1 of the one stream a single process draws.
    stream = RandomWindows(load_shard(shard, "train"), BLOCK, 4, seed=0)
    assert np.array_equal(w0, stream.global_batch(0)["input_ids"].numpy())
    assert np.array_equal(w1, stream.global_batch(1)["input_ids"].numpy())
