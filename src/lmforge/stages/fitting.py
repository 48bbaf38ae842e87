"""What every training stage does the same way around the core: params -> core configs,
the MLflow logger, the loss-curve callback that feeds DVC plots (CSVs and a PNG), and sample generations.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as L
import torch
from pydantic import BaseModel

from lmforge.atomic import atomic_path
from lmforge.generation.chat import ChatEngine
from lmforge.generation.driver import generate
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model import GPT, GPTConfig
from lmforge.params import ModelParams, Params, TrainParams
from lmforge.stages import curves, runs_dir
from lmforge.tokenizer import ChatTokenizer
from lmforge.training import OptimConfig, TrainerConfig


def fields_of(section: BaseModel, target: type) -> dict[str, Any]:
    """The values of `section` (validated params) for the fields of the core dataclass `target`,
    matched by name: the core configs are built from params, never copied field by field."""
    names = {f.name for f in dataclasses.fields(target)}
    return {k: v for k, v in section.model_dump().items() if k in names}


def gpt_config(model: ModelParams, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, **fields_of(model, GPTConfig))


def optim_config(tp: TrainParams) -> OptimConfig:
    return OptimConfig(**fields_of(tp, OptimConfig))


def trainer_config(params: Params, stage: str) -> TrainerConfig:
    """The stage's Trainer settings; its seed is the stage seed derived from the run's one seed."""
    tp: TrainParams = params.section(stage)
    knobs = fields_of(tp, TrainerConfig)
    if getattr(tp, "global_batch_tokens", None):  # the global batch decides the accumulation
        from lmforge.training.distributed import accumulation, world_size

        world = world_size(tp.devices, tp.num_nodes, tp.accelerator)
        try:
            knobs["accumulate_grad_batches"] = accumulation(
                tp.global_batch_tokens, tp.batch_size, params.model.block_size, world
            )
        except ValueError as err:
            raise ValueError(f"{stage}.{err}") from None
    return TrainerConfig(**knobs, seed=params.stage_seed(stage), deterministic=params.deterministic)


def for_evaluation(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A model made ready for its stage's own evaluation (held-out loss, bits/byte, samples, before and
    after figures): on `device`, the one that trains (Lightning's teardown leaves a trained model on
    the CPU, where evaluating a real corpus takes hours), in fp32, in eval mode, and eager: a forward
    compiled for training (``nn.Module.compile``) would recompile for each new evaluation shape."""
    for m in model.modules():
        m._compiled_call_impl = None
    return model.to(device).float().eval()


def mlflow_logger():
    """Lightning's MLFlowLogger attached to the stage's active MLflow run; None on a worker rank, which
    has no run: MLFlowLogger opens the store when created, and four ranks creating a fresh SQLite
    store's tables at once crashed a launch ("table experiments already exists")."""
    import mlflow
    from pytorch_lightning.loggers import MLFlowLogger

    from lmforge import tracking
    from lmforge.stages import is_worker_rank

    if is_worker_rank():
        return None

    run = mlflow.active_run()
    return MLFlowLogger(
        tracking_uri=tracking.tracking_uri(),
        run_id=run.info.run_id if run else None,
        experiment_name=tracking.EXPERIMENT,
        log_model=False,
    )


class LossCurve(L.Callback):
    """Records logged metrics per optimizer step, written as CSV for `dvc plots`.

    `train.csv` holds the keys logged while training (train/*, rl/*, ...), `val.csv` the val/* keys.
    """

    def __init__(self, keys: tuple[str, ...] = ("train/loss", "val/loss", "val/bits_per_byte")) -> None:
        self.keys = keys
        self.rows: dict[str, list[dict]] = {"train": [], "val": []}

    def _record(self, trainer: L.Trainer, split: str) -> None:
        row: dict = {"step": trainer.global_step}
        for key in self.keys:
            value = trainer.callback_metrics.get(key)
            if (
                key.startswith("val/") == (split == "val")
                and value is not None
                and math.isfinite(float(value))
            ):
                row[key.replace("/", "_")] = round(float(value), 5)
        if len(row) > 1:
            self.rows[split].append(row)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._record(trainer, "train")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "val")

    # Saved in checkpoints, so a resumed run's curve also holds the steps before the interruption.
    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = {split: list(rows) for split, rows in state_dict["rows"].items()}

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.rows["train"] or self.rows["train"][-1]["step"] != trainer.global_step:
            self._record(trainer, "train")  # the last step, whatever log_every_n_steps is

    def write(self, folder: Path) -> None:
        """Both files are always written (DVC declares them as outputs), header-only if empty."""
        for split, rows in self.rows.items():
            columns = ["step", *sorted({k for r in rows for k in r if k != "step"})]
            with atomic_path(folder / f"{split}.csv") as tmp, tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns)
                writer.writeheader()
                writer.writerows({c: r.get(c, "") for c in columns} for r in rows)


def sample_markdown(
    model: GPT, tok: ChatTokenizer, prompts: list[str], max_new_tokens: int, seed: int, chat: bool = False
) -> str:
    """A few sampled continuations (or chat replies) as markdown, for a person to read.

    Prompts render and replies stop as the engine's do; the text keeps special tokens, to be seen.
    """
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed, stop_token_ids=tok.stop_ids(chat)
    )
    engine = ChatEngine(model.float(), tok)
    ids = [
        engine.chat_ids([{"role": "user", "content": p}]) if chat else engine.prompt_ids(p) for p in prompts
    ]
    outs = generate(engine.model, ids, params, decode=tok.decode, pad_id=tok.pad_id)
    lines = ["# Samples", ""]
    for prompt, out in zip(prompts, outs):
        lines += [f"## {prompt!r}", "", "```", (prompt if not chat else "") + (out.text or ""), "```", ""]
    return "\n".join(lines)


def fit_stage(
    stage: str,
    module: L.LightningModule,
    data: L.LightningDataModule,
    cfg: TrainerConfig,
    *,
    root: Path,
    resume: bool,
    curve_keys: tuple[str, ...],
    run_name: str | None = None,
) -> tuple[L.Trainer, float]:
    """Fit with the shared core, logging to the stage's MLflow run; writes `plots/<stage>/*.csv` and
    their image `plots/<stage>/loss.png`, also logged to the active MLflow run under `plots/`.

    Checkpoints live in `.lmforge/runs/<run_name or stage>/checkpoints` (`resume` continues there).
    Returns the trainer and the wall-clock training seconds.
    """
    from lmforge.training import fit

    curve = LossCurve(keys=curve_keys)
    start = time.perf_counter()
    trainer = fit(
        module,
        data,
        cfg,
        resume=resume,
        default_root_dir=runs_dir(root) / (run_name or stage),
        logger=mlflow_logger(),
        callbacks=[curve],
    )
    seconds = time.perf_counter() - start
    if trainer.global_rank == 0:
        folder = root / "plots" / stage
        curve.write(folder)
        png = curves.write_loss_png(folder, stage)
        curves.log_to_mlflow([folder / "train.csv", folder / "val.csv", png])
    return trainer, seconds
