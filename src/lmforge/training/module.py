"""LightningModules shared by every training stage.

`TrainModule` owns the optimizer/schedule, step timing, throughput/MFU logging and
gradient clipping; a stage only implements `compute_loss` (and optionally
`tokens_in_batch`). `CausalLMModule` is next-token cross-entropy with -100 masking,
used as-is by pretraining and SFT.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import pytorch_lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.training.config import OptimConfig
from lmforge.training.optim import build_optimizer

IGNORE_INDEX = -100

# Dense bf16 tensor-core peak FLOP/s (no sparsity), matched by substring of the device name, the
# first match wins: the PCIe and NVL H100s are slower than the SXM one ("NVIDIA H100 80GB HBM3").
PEAK_FLOPS_BF16: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
}
# Unknown GPUs: assume A100-class so MFU stays a rough but finite number.
FALLBACK_PEAK_FLOPS = 312e12


def peak_flops(device: torch.device | str) -> float:
    """Peak bf16 FLOP/s for a CUDA device (or a device name), falling back to `FALLBACK_PEAK_FLOPS`."""
    name = device if isinstance(device, str) else torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_BF16.items():
        if key in name:
            return flops
    return FALLBACK_PEAK_FLOPS


class TrainModule(L.LightningModule):
    """Base module: subclasses implement `compute_loss(batch) -> (loss, metrics)`."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        *,
        compile_model: bool = False,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        # Not named `compile`: that would shadow nn.Module.compile().
        self.compile_model = compile_model
        self._compiled = False
        self._last_step_time: float | None = None
        # Only plain values go into hparams (the model object is not serialisable config).
        model_cfg = getattr(model, "config", None)
        plain: dict[str, Any] = {"optim": asdict(optim)}
        if model_cfg is not None and hasattr(model_cfg, "to_dict"):
            plain["model_config"] = model_cfg.to_dict()
        plain.update(hparams or {})
        self.save_hyperparameters(plain)

    # ---- hooks for subclasses -------------------------------------------------
    def compute_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def tokens_in_batch(self, batch: Any) -> int:
        """Tokens processed per micro-batch (for throughput); 0 disables throughput logging."""
        return 0

    def val_metrics(self, loss: Tensor, batch: Any) -> dict[str, Tensor]:
        """Extra validation-only metrics derived from the loss (e.g. bits per byte)."""
        return {}

    # ---- Lightning plumbing ---------------------------------------------------
    def configure_model(self) -> None:
        # Called on every setup; compile in place (keeps state_dict keys free of `_orig_mod.`).
        if self.compile_model and not self._compiled:
            self.model.compile()
            self._compiled = True

    def configure_optimizers(self) -> Any:
        opt, sched = build_optimizer(self.model, self.optim)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Clip through Lightning (AMP-unscale/FSDP aware); OptimConfig.grad_clip unless the Trainer overrides.
        clip = self.optim.grad_clip if gradient_clip_val is None else gradient_clip_val
        if clip and clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def on_train_start(self) -> None:
        self._last_step_time = None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss, metrics = self.compute_loss(batch)
        bs = self.batch_weight(batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for k, v in metrics.items():
            self.log(f"train/{k}", v, batch_size=bs)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, batch_size=bs)
        self._log_throughput(batch)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, metrics = self.compute_loss(batch)
        metrics = {**metrics, **self.val_metrics(loss, batch)}
        bs = self.batch_weight(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
        for k, v in metrics.items():
            self.log(f"val/{k}", v, sync_dist=True, batch_size=bs)

    # ---- helpers ----------------------------------------------------------------
    def batch_weight(self, batch: Any) -> int | None:
        """Weight for epoch-level means; None lets Lightning infer it."""
        return None

    def _log_throughput(self, batch: Any) -> None:
        """tokens/s from wall time since the previous micro-batch (steady state after step 1)."""
        now = time.perf_counter()
        last, self._last_step_time = self._last_step_time, now
        tokens = self.tokens_in_batch(batch)
        if last is None or tokens <= 0 or now <= last:
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        tps = tokens * world / (now - last)
        self.log("throughput/tokens_per_sec", tps, batch_size=1)
        if self.device.type == "cuda" and hasattr(self.model, "flops_per_token"):
            # MFU against the whole job's peak: every rank contributes tokens * flops_per_token.
            fpt = float(self.model.flops_per_token())
            self.log("throughput/mfu", fpt * tps / (peak_flops(self.device) * world), batch_size=1)


class CausalLMModule(TrainModule):
    """Next-token prediction: batch = {"input_ids": [B,T], "labels": [B,T]} with -100 ignored.

    Optional ``attention_mask`` / ``segment_ids`` [B,T] (SFT padding / packing) go to the model.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimConfig,
        *,
        val_tokens_per_byte: float | None = None,
        compile_model: bool = False,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        extra = {"val_tokens_per_byte": val_tokens_per_byte, **(hparams or {})}
        super().__init__(model, optim, compile_model=compile_model, hparams=extra)
        self.val_tokens_per_byte = val_tokens_per_byte

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # SFT batches carry padding / packing masks; pretraining windows have neither, so the
        # model is then called exactly as before (fused causal path).
        extra = {k: batch[k] for k in ("attention_mask", "segment_ids") if k in batch}
        logits = self.model(batch["input_ids"], **extra)
        loss = causal_lm_loss(logits, batch["labels"])
        return loss, {}

    def tokens_in_batch(self, batch: dict[str, Tensor]) -> int:
        return int(batch["input_ids"].numel())

    def batch_weight(self, batch: dict[str, Tensor]) -> int:
        # Weight epoch means by counted tokens so val/loss is a per-token average.
        return max(1, int((batch["labels"] != IGNORE_INDEX).sum()))

    def val_metrics(self, loss: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.val_tokens_per_byte is None:
            return {}
        # bpb is linear in the loss, so the token-weighted epoch mean matches val/loss exactly.
        return {"bits_per_byte": bits_per_byte(loss, self.val_tokens_per_byte)}


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross entropy over positions whose label != -100 (0 if none are kept)."""
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def bits_per_byte(loss_nats: float | Tensor, tokens_per_byte: float) -> float | Tensor:
    """Convert per-token loss in nats to bits per UTF-8 byte (tokenizer-independent)."""
    return loss_nats / math.log(2) * tokens_per_byte
