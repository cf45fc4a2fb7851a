"""The training loop: the engine's own calls on T-frame clips, AdamW, checkpoints that resume.

One step is exactly what the propagation engine does on a video, through the same step function
(core/step.py): frame 0 and its true masks go into memory, frame 1 is segmented, frame 1 with its
predicted (soft-aggregated) probabilities goes into memory, frame 2 is segmented from memory
{0, 1}, and so on: later frames are read
from memory holding the network's own predictions, where masks shrink or drift if they do
(optionally through the engine's motion prior). The loss is the cross-entropy of the
soft-aggregated predictions of frames 1.. against their labels.

Reproducible: the model is initialised from ``seed``; sample ``j`` of step ``s`` is dataset index
``s * batch_size + j`` (a pure function of the seed and that index); a checkpoint holds the model,
optimizer, gradient scaler, step and RNG states, so a resumed run continues exactly as an
uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from napari_stm.core.atomic import atomic_path
from napari_stm.core.errors import CheckpointError, InputError
from napari_stm.core.model import QueryFeatures
from napari_stm.core.readout import motion_prior
from napari_stm.core.step import Read, step
from napari_stm.core.stm_lite import STMLite
from napari_stm.core.weights import load_state_dict, read_state_dict, resolve_device
from napari_stm.train.losses import bootstrap_fraction, bootstrapped_cross_entropy

logger = logging.getLogger(__name__)

CHECKPOINT = "last.pth"
WEIGHTS = "stm_lite.pth"
LOG = "log.csv"
CURVE = "loss.png"
LOG_FIELDS = (
    "step",
    "loss",
    "cross_entropy",
    "lr",
    "top_fraction",
    "max_gap",
    "seconds",
    "samples_per_s",
)


@dataclass
class TrainConfig:
    """One training stage. Paths are strings so the config is stored in checkpoints as is."""

    out: str
    iterations: int = 10_000
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.05
    #: linear learning-rate warm-up, in steps; cosine decay to ``lr * final_lr`` after it
    warmup: int = 200
    final_lr: float = 0.1
    #: bootstrapped cross-entropy: final share of hardest pixels (1.0 = plain cross-entropy),
    #: reached between these fractions of the run
    bootstrap: float = 0.15
    bootstrap_start: float = 0.2
    bootstrap_end: float = 0.5
    #: train the ImageNet image encoder too (at a tenth of the learning rate)
    finetune_encoder: bool = False
    grad_clip: float = 5.0
    objects: int = 2
    seed: int = 0
    device: str | None = None
    amp: bool = True
    workers: int = 0
    log_every: int = 10
    save_every: int = 500
    #: weights (a stm-lite checkpoint) to start from, e.g. the end of stage 1
    init: str | None = None
    #: share of steps that read memory through the engine's motion prior, its spread per clip
    #: frame drawn log-uniformly in ``motion_sigma`` (a share of the crop's side)
    motion_probability: float = 0.0
    motion_sigma: tuple[float, float] = (0.05, 0.3)
    #: the ImageNet EfficientNet-Lite the network is built on when no model is given
    backbone: str = "lite0"

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "log_every", "save_every", "objects"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if not 0 < self.bootstrap <= 1:
            raise InputError(f"bootstrap must be in (0, 1], got {self.bootstrap}")
        if self.workers < 0 or self.warmup < 0:
            raise InputError("workers and warmup must not be negative")


# --------------------------------------------------------------------------- one step


def one_hot_masks(labels: Tensor, objects: int) -> Tensor:
    """[B, H, W] labels 0..K -> [B, K, H, W] float masks of objects 1..K."""
    return F.one_hot(labels, objects + 1)[..., 1:].permute(0, 3, 1, 2).float()


def clip_logits(
    model: STMLite,
    images: Tensor,
    labels: Tensor,
    objects: int,
    motion_sigma: float | None = None,
) -> list[Tensor]:
    """Soft-aggregated class logits [B, 1 + objects, S, S] of frames 1..T-1 of a batch of clips,
    computed by the engine's step function (core/step.py).

    ``images`` [B, T, 3, S, S] in [0, 1], ``labels`` [B, T, S, S] (0..objects); only frame 0's
    labels are used. Every frame is memorised (the engine with ``mem_every=1``) with its
    soft-aggregated probabilities, and read densely. ``motion_sigma``: the engine's
    position-aware read (:func:`napari_stm.core.readout.motion_prior`) with this spread per
    frame, or none.
    """
    t = images.shape[1]
    if t < 2:
        raise InputError("a training clip needs at least 2 frames")
    query = model.encode_query(images[:, 0])
    entry = model.encode_memory(images[:, 0], one_hot_masks(labels[:, 0], objects), query)
    keys, values = [entry.keys.flatten(2)], [entry.values.flatten(3)]

    def memory(query: QueryFeatures) -> Read:
        prior = None
        if motion_sigma is not None:
            grid = query.key.shape[-2:]
            gaps = torch.arange(len(keys), 0, -1, device=images.device)  # frames 0..i-1
            prior = motion_prior(gaps, (grid[0], grid[1]), motion_sigma)
        return Read(torch.cat(keys, -1), torch.cat(values, -1), prior=prior)

    out = []
    for i in range(1, t):
        res = step(model, images[:, i], memory, logits=True)
        out.append(res.logits)
        if i < t - 1:
            entry = model.encode_memory(images[:, i], res.objects, res.query)
            keys.append(entry.keys.flatten(2))
            values.append(entry.values.flatten(3))
    return out


def clip_loss(
    model: STMLite, images: Tensor, labels: Tensor, objects: int, top_fraction: float = 1.0
) -> Tensor:
    """Mean over frames 1..T-1 of the (bootstrapped) cross-entropy of :func:`clip_logits`."""
    return _losses(clip_logits(model, images, labels, objects), labels, top_fraction)[0]


def _losses(logits: list[Tensor], labels: Tensor, top_fraction: float) -> tuple[Tensor, Tensor]:
    """(the bootstrapped loss to optimise, the plain cross-entropy to watch)."""
    boot = [
        bootstrapped_cross_entropy(agg, labels[:, i + 1], top_fraction)
        for i, agg in enumerate(logits)
    ]
    if top_fraction >= 1:
        plain = boot
    else:
        plain = [F.cross_entropy(agg.detach(), labels[:, i + 1]) for i, agg in enumerate(logits)]
    return torch.stack(boot).mean(), torch.stack(plain).mean().detach()


# --------------------------------------------------------------------------- the trainer


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Mixed precision's dtype on this device, or None (full fp32).

    bfloat16 where the GPU has it: float32's range, so no loss scaling and no overflow in the
    memory read's exponentials; float16 (with a gradient scaler) on older GPUs. Never on CPU,
    where reduced precision is many times slower, not faster.
    """
    if device.type != "cuda" or not enabled:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def _atomic_save(obj: object, path: Path) -> None:
    # A crash mid-write must never leave a truncated checkpoint where a good one was.
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class Trainer:
    """Runs one stage: ``Trainer(config, dataset).run(resume=...)``."""

    def __init__(
        self,
        config: TrainConfig,
        dataset: Dataset,
        model: STMLite | None = None,
        progress: Callable[[int, int, float], object] | None = None,
    ) -> None:
        self.config = config
        self.dataset = dataset
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        if model is None:
            # Weights to start from hold the image encoder too: the ImageNet ones (and their
            # package) are needed only for a run from scratch.
            model = STMLite(pretrained=config.init is None, backbone=config.backbone)
        self.model = model.to(self.device)
        if config.init:
            load_state_dict(self.model, read_state_dict(config.init), config.init)
        self.model.encoder.requires_grad_(config.finetune_encoder)
        groups = []
        for scale, in_encoder in ((1.0, False), (0.1, True)):
            params = [
                p
                for n, p in self.model.named_parameters()
                if p.requires_grad and n.startswith("encoder.") == in_encoder
            ]
            # No weight decay on biases and scalars (the affinity scale, the prior's gain).
            for decay, chosen in (
                (config.weight_decay, [p for p in params if p.dim() > 1]),
                (0.0, [p for p in params if p.dim() <= 1]),
            ):
                if chosen:
                    groups.append({"params": chosen, "lr_scale": scale, "weight_decay": decay})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        self.amp_dtype = amp_dtype(self.device, config.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step = 0
        #: plain cross-entropy of the last step (the loss optimised may be bootstrapped)
        self.last_cross_entropy = math.nan
        self.progress = progress

    # -- schedule ---------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        span = max(1, c.iterations - c.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - c.warmup) / span)))
        return c.lr * (c.final_lr + (1 - c.final_lr) * cos)

    def top_fraction_at(self, step: int) -> float:
        c = self.config
        return bootstrap_fraction(
            step, c.iterations, c.bootstrap, c.bootstrap_start, c.bootstrap_end
        )

    def motion_sigma_at(self, step: int) -> float | None:
        """The motion prior's spread at ``step`` (None: no prior), a pure function of the step
        so that a resumed run draws the same."""
        c = self.config
        if c.motion_probability <= 0:
            return None
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        if u[0] >= c.motion_probability:
            return None
        lo, hi = (math.log(x) for x in c.motion_sigma)
        return math.exp(lo + (hi - lo) * u[1])

    # -- steps ------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Tensor]) -> float:
        """One optimisation step on a collated batch; returns the loss."""
        self.model.train()
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        with _autocast(self.amp_dtype):
            logits = clip_logits(
                self.model, images, labels, self.config.objects, self.motion_sigma_at(self.step)
            )
        logits = [x.float() for x in logits]
        loss, plain = _losses(logits, labels, self.top_fraction_at(self.step))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {loss.item()} at step {self.step}: lower --lr or check the data"
            )
        self.last_cross_entropy = float(plain)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.config.grad_clip
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return float(loss.detach())

    def batches(self) -> Iterator[dict[str, Tensor]]:
        """The batches of the remaining steps, from the current step on."""
        b = self.config.batch_size
        loader = DataLoader(
            self.dataset,
            batch_size=b,
            sampler=range(self.step * b, self.config.iterations * b),
            num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        return iter(loader)

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": rng,
            "config": dataclasses.asdict(self.config),
        }

    def save(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CHECKPOINT
        _atomic_save(self.state(), path)
        return path

    def load(self, path: str | os.PathLike) -> None:
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"training checkpoint not found: {path}") from None
        except Exception as e:
            raise CheckpointError(f"cannot read training checkpoint {path}: {e}") from None
        needed = {"model", "optimizer", "scaler", "step", "rng"}
        if not isinstance(state, dict) or not needed <= set(state):
            raise CheckpointError(
                f"{path} is not a napari-stm training checkpoint (needs {sorted(needed)})"
            )
        load_state_dict(self.model, state["model"], str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def export(self, path: str | os.PathLike | None = None) -> Path:
        """The model weights alone (what ``load_model("stm-lite", weights=...)`` reads)."""
        path = Path(path) if path is not None else self.out / WEIGHTS
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        _atomic_save(state, path)
        return path

    # -- the run ----------------------------------------------------------------------------
    def run(self, resume: bool = False, stop_at: float | None = None) -> Path:
        """Train to ``config.iterations``; returns the exported weights file.

        ``stop_at`` (a ``time.monotonic()`` value): stop there even if steps remain, saved and
        exported as at the end (a time budget is kept even when the steps got slower than
        planned); ``resume`` continues such a run.
        """
        ckpt = self.out / CHECKPOINT
        if resume:
            if not ckpt.is_file():
                raise InputError(f"nothing to resume: {ckpt} does not exist")
            self.load(ckpt)
            logger.info("resumed from %s at step %d", ckpt, self.step)
        elif ckpt.exists():
            raise InputError(
                f"{self.out} already holds a training run ({ckpt}); pass --resume to continue "
                "it or choose another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        log = CsvLog(self.out / LOG, keep_until=self.step)
        c = self.config
        window: list[float] = []
        window_ce: list[float] = []
        t0 = time.perf_counter()
        last_log = t0
        for batch in self.batches():
            loss = self.train_step(batch)
            window.append(loss)
            window_ce.append(self.last_cross_entropy)
            if self.step % c.log_every == 0 or self.step == c.iterations:
                now = time.perf_counter()
                gap = getattr(self.dataset, "gap_at", None)
                log.write(
                    step=self.step,
                    loss=sum(window) / len(window),
                    cross_entropy=sum(window_ce) / len(window_ce),
                    lr=self.lr_at(self.step - 1),
                    top_fraction=self.top_fraction_at(self.step - 1),
                    max_gap=gap((self.step - 1) * c.batch_size) if gap else "",
                    seconds=now - t0,
                    samples_per_s=len(window) * c.batch_size / max(now - last_log, 1e-9),
                )
                if self.progress is not None:
                    self.progress(self.step, c.iterations, sum(window) / len(window))
                window, window_ce, last_log = [], [], now
            out_of_time = stop_at is not None and time.monotonic() >= stop_at
            if self.step % c.save_every == 0 or self.step == c.iterations or out_of_time:
                self.save()
                plot_loss_curve(self.out / LOG, self.out / CURVE)
            if out_of_time and self.step < c.iterations:
                logger.warning(
                    "time budget spent at step %d of %d: saved; --resume continues",
                    self.step,
                    c.iterations,
                )
                break
        return self.export()


def seconds_per_step(config: TrainConfig, dataset: Dataset, steps: int = 20) -> float:
    """Wall-clock seconds of one training step of ``config`` on this machine, data loading
    included: what a time budget (``napari-stm train --minutes``) turns into iterations.

    Measured on a throwaway trainer (its own model and optimizer, a temporary folder), so the
    run itself starts from its step 0 as planned. The first steps are not counted: they start
    the loader's workers and fill their prefetch queue, which would flatter a data-bound run.
    """
    import tempfile

    skip = 2 * config.workers + 3
    with tempfile.TemporaryDirectory() as tmp:
        probe = Trainer(
            dataclasses.replace(
                config, out=tmp, iterations=skip + steps, save_every=10**9, log_every=10**9
            ),
            dataset,
        )
        stamps = []
        for batch in probe.batches():
            probe.train_step(batch)
            if probe.device.type == "cuda":
                torch.cuda.synchronize(probe.device)
            stamps.append(time.perf_counter())
        device = probe.device
        del probe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return (stamps[-1] - stamps[skip - 1]) / steps


class CsvLog:
    """Append-only CSV of training progress; rows past a resumed step are dropped first."""

    def __init__(self, path: Path, keep_until: int = 0) -> None:
        self.path = path
        rows = read_log(path) if path.is_file() else []
        rows = [r for r in rows if int(r["step"]) <= keep_until]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def write(self, **row: object) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def read_log(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_loss_curve(log_path: Path, png_path: Path) -> None:
    """Loss against step (and a smoothed curve) as a PNG; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the "train" extra brings it; the run itself does not need it
        logger.warning("matplotlib is not installed: no loss curve drawn")
        return
    rows = read_log(log_path)
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in (
        ("cross_entropy", "cross-entropy, all pixels"),
        ("loss", "loss optimised (hardest pixels)"),
    ):
        values = [float(r.get(column) or "nan") for r in rows]
        k = max(1, len(values) // 20)
        smooth = [
            sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1])
            for i in range(len(values))
        ]
        (line,) = ax.plot(steps, values, alpha=0.3)
        ax.plot(steps, smooth, color=line.get_color(), label=f"{label} (mean of {k})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path, suffix=".part.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
