"""The generic training loop of every generated package: :class:`Trainer`.

A generated ``train.py`` holds what is particular to its package (the ``TrainConfig`` dataclass
with the compiled defaults, how a batch feeds the model, the loss, the metric and the backward)
and hands those pieces to :class:`Trainer`; everything else lives here, the same for every
package: flags checked, distributed setup, data, model/EMA/DDP/FSDP/compile, the run folder and
an exact resume, the loop (AMP, accumulation with ``no_sync``, EMA updates, periodic and signal
saves), validation of the raw and the EMA weights, best.pt/last.pt, metrics.jsonl, MLflow and
curves.png. The same code runs single-process and under torchrun.

From Python, with a built package installed::

    from convnextv2_femto.train import TrainConfig, make_trainer

    result = make_trainer(TrainConfig(epochs=1, max_steps=2, mlflow=False)).fit()
    result.run_dir, result.best
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scmc_runtime.augmix import JsdWiring, split_losses
from scmc_runtime.batches import Batch, DataSource, ImageData, TableData
from scmc_runtime.batchnorm import sync_batchnorm
from scmc_runtime.checkpoint import FORMAT_VERSION, gather_rng_states, model_signature, save_checkpoint, set_rng_state
from scmc_runtime.config import validate_config
from scmc_runtime.curves import RunCurves
from scmc_runtime.data import BadImageError, build_loader, validation_subset
from scmc_runtime.distributed import seed_everything, setup_distributed
from scmc_runtime.elastic import elastic_resume, note_elastic_run
from scmc_runtime.ema import ModelEma
from scmc_runtime.errors import TrainError
from scmc_runtime.fsdp import ShardedEma, averaged_model, check_strategy, load_sharded, save_sharded, shard_model
from scmc_runtime.logging import MetricsFile, MlflowLogger, Progress, get_logger
from scmc_runtime.metrics import MetricAccumulator
from scmc_runtime.overrides import RunSettings, check_run_flags, resume_problem, run_overrides, step_metrics
from scmc_runtime.pretrained import init_from
from scmc_runtime.recipe import BatchRecipe, Recipe, check_recipe, collate_fn, train_sampler
from scmc_runtime.runs import load_resume_state, resolve_run, start_run
from scmc_runtime.signals import GracefulStop
from scmc_runtime.train import (
    check_classes,
    compiled_hyperparameters,
    configure_torch,
    format_metrics,
    next_steps,
    probe_model,
)

__all__ = ["Batch", "ImageData", "JsdWiring", "TableData", "Trainer", "FitResult"]  # the batches re-exported


# ---------------------------------------------------------------------------------------------
# The trainer

Scores = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class FitResult:
    """What :meth:`Trainer.fit` leaves: the run folder, the best checkpoint and where the run stopped."""

    run_dir: Path
    best: Dict[str, Any]  # {"metric": name, "value": float or None, "epoch": int or None}
    checkpoint: Path  # best.pt (it exists when some epoch was validated)
    global_step: int
    stopped: bool  # by a signal: continue with --resume auto
    seconds: float


class Trainer:
    """Trains one package with the flags of ``cfg`` (its ``TrainConfig``), as ``python -m <pkg>.train`` does.

    The package's pieces: ``model``, ``loss``, ``metric`` (or None) and ``backward`` are the
    classes of its model.py, loss.py, metric.py and backward.py; ``forward(model, batch)`` feeds
    the model, ``compute_losses(criterion, outputs, batch)`` and ``compute_metrics(metric,
    outputs, batch)`` return named scalar tensors (``losses`` and ``metrics`` name them), and
    ``backward_step(backward, losses, last_in_epoch)`` runs one backward pass (the optimizer
    update every ``--grad-accum-steps``) and says whether the weights changed. ``data`` is
    where batches come from; ``soft_targets`` > 0: the loss takes probabilities over that
    many classes; ``jsd`` which model output holds the classification logits and which loss
    takes the JSD term of ``--aug-splits`` (scmc_runtime.augmix). :meth:`fit` runs it; a mistake in the flags, the data or a checkpoint is a
    ``TrainError`` (``UsageError`` for the flags) raised before anything is written.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        package: str,
        model: Callable[[], nn.Module],
        loss: Callable[[], nn.Module],
        metric: Optional[Callable[[], nn.Module]],
        backward: Any,
        forward: Callable[[nn.Module, Batch], Any],
        compute_losses: Callable[[Any, Any, Batch], Scores],
        compute_metrics: Callable[[Any, Any, Batch], Scores],
        backward_step: Callable[[Any, Scores, bool], bool],
        losses: Sequence[str],
        metrics: Sequence[str] = (),
        data: Optional[DataSource] = None,
        soft_targets: int = 0,
        jsd: Optional[JsdWiring] = None,
    ) -> None:
        self.cfg = cfg
        self.package = package
        self.model_class = model
        self.loss_class = loss
        self.metric_class = metric
        self.backward_class = backward
        self.forward = forward
        self.compute_losses = compute_losses
        self.compute_metrics = compute_metrics
        self.backward_step = backward_step
        self.losses = tuple(losses)
        self.metrics = tuple(metrics)
        self.data: DataSource = data if data is not None else ImageData()
        self.soft_targets = soft_targets
        self.jsd = jsd
        self.saved_at: Optional[int] = None  # the global step last.pt holds, if any

    # -- the run, top to bottom ------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train: check every flag, set up, resume if asked, run the epochs, write the records."""
        self._check_flags()
        self.started = time.monotonic()
        self._setup_process()
        self._build_data()
        self._build_model()
        self._open_run()
        self._resume()
        self._wrap_model()
        self._start_logging()
        return self._train()

    def _check_flags(self) -> None:
        cfg = self.cfg
        # Every flag is checked before anything is created: all problems in one message, exit 2.
        validate_config(cfg, losses=self.losses, metrics=self.metrics)
        check_strategy(cfg)
        # --lr, --precision, ...: a run's values over what backward.py was compiled with (Backward.compiled).
        check_run_flags(cfg, self.backward_class.compiled)
        # What the data source cannot do at all (an image table: timm's pipeline, aug splits) comes first.
        self.data.check(Recipe.from_config(cfg))
        # timm's recipe (--data-pipeline timm): mixup, cutmix and label smoothing need a soft-target loss,
        # --aug-splits the model output that holds the logits (the JSD term).
        self.recipe = check_recipe(
            cfg, soft_loss=self.soft_targets > 0, autocast=cfg.precision != "float32", jsd=self.jsd
        )

    def _setup_process(self) -> None:
        cfg = self.cfg
        # Distributed setup from torchrun's environment (single process without it), then seeding.
        self.dist = setup_distributed(cfg.device)  # gloo on CPU, nccl on GPU
        self.device = self.dist.device
        configure_torch(self.device, threads=cfg.threads, deterministic=cfg.deterministic)
        torch.set_float32_matmul_precision(cfg.matmul_precision)
        self.log = get_logger(self.package, self.dist.is_main)

    def _build_data(self) -> None:
        cfg, dist = self.cfg, self.dist
        # Cheap checks of the model and the data before any file is written: the image size fits
        # the model (a forward pass on the meta device), the folders and classes fit its head.
        output_shapes = probe_model(
            self.model_class,
            lambda m, images, labels: self.forward(m, self.data.probe_batch(images, labels)),
            cfg.image_size,
        )
        self.train_set: Any
        self.train_set, val_set, self.classes = self.data.datasets(dist, cfg, self.recipe, self.log.warning)
        check_classes(self.classes, output_shapes, allow=cfg.allow_class_mismatch)
        # --max-val-steps: a random subset of the validation images, the same for every epoch and seed.
        self.val_set: Any = validation_subset(val_set, cfg.max_val_steps * cfg.batch_size, seed=cfg.seed)
        self.batch_per_rank = cfg.batch_size // dist.world_size
        repeats = train_sampler(
            self.train_set,
            rank=dist.rank,
            world_size=dist.world_size,
            seed=cfg.seed,
            repeats=self.recipe.num_aug_repeats,
        )
        loader_args: Dict[str, Any] = dict(
            workers=cfg.workers, seed=cfg.seed, pin_memory=cfg.pin_memory, persistent_workers=cfg.persistent_workers
        )
        self.train_loader: Any = build_loader(
            self.train_set,
            self.batch_per_rank,
            True,
            dist,
            sampler=repeats,
            collate_fn=collate_fn(self.recipe),
            **loader_args,
        )
        self.val_loader = build_loader(self.val_set, self.batch_per_rank, False, dist, **loader_args)
        # Soft targets span the classes the loss was compiled for (the preset's num_classes), if any.
        self.prepare_batch = BatchRecipe(
            self.recipe, self.soft_targets or len(self.classes), self.device, seed=cfg.seed, rank=dist.rank
        )
        loader_steps = len(self.train_loader)
        self.steps_per_epoch = min(loader_steps, cfg.max_steps) if cfg.max_steps else loader_steps
        if self.steps_per_epoch == 0:
            raise TrainError(f"{len(self.train_set)} training images do not fill one global batch of {cfg.batch_size}")

    def _build_model(self) -> None:
        cfg, dist, log = self.cfg, self.dist, self.log
        # Model, loss, metric and backward (optimizers, schedulers, AMP, accumulation).
        seed_everything(cfg.seed)  # the same initial weights on every rank
        net = self.model_class()
        # Fine-tuning: weights mapped by name, else by order and shape (a resume replaces them).
        if cfg.init_from:
            log.info(init_from(net, cfg.init_from, reset_head=cfg.reset_head))
        # Under DDP, BatchNorm statistics over all ranks (SyncBatchNorm; on CPU CpuSyncBatchNorm; --no-sync-bn: per rank).
        net = sync_batchnorm(net, dist, enabled=cfg.sync_bn, log=log.warning)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.net = net = net.to(self.device, memory_format=self.memory_format)  # type: ignore[call-overload]
        # The optimizer flags override what backward.py was compiled with (Backward.compiled), for this run.
        overrides = run_overrides(cfg, self.backward_class.compiled)
        # --strategy fsdp: fully_shard each repeated block, then the root, before the optimizers exist.
        self.sharding = None
        if cfg.strategy == "fsdp":
            self.sharding = shard_model(
                net,
                dist,
                unit=cfg.fsdp_unit,
                reshard_after_forward=cfg.reshard_after_forward,
                activation_checkpointing=cfg.activation_checkpointing,
                autocast_dtype=RunSettings(self.backward_class.compiled, overrides).autocast_dtype,  # --precision
            )
            log.info(self.sharding.describe())
        self.criterion = self.loss_class().to(self.device)
        self.metric = self.metric_class().to(self.device) if self.metric_class is not None else None
        updates_per_epoch = math.ceil(self.steps_per_epoch / cfg.grad_accum_steps)
        self.backward = self.backward_class(
            net,
            updates_per_epoch=updates_per_epoch,
            epochs=cfg.epochs,
            device_type=self.device.type,
            overrides=overrides,
        )
        self.ema: Any = None
        if cfg.ema and self.sharding is not None:  # FSDP: each rank averages its own shards
            self.ema = ShardedEma(net, cfg.ema_decay, warmup=cfg.ema_warmup)
        elif cfg.ema:
            self.ema = ModelEma(
                net,
                cfg.ema_decay,
                warmup=cfg.ema_warmup,
                min_decay=cfg.ema_min_decay,
                update_after_step=cfg.ema_update_after_step,
                warmup_gamma=cfg.ema_warmup_gamma,
                warmup_power=cfg.ema_warmup_power,
                foreach=cfg.ema_foreach,
                exclude_buffers=cfg.ema_exclude_buffers,
            )

    def _open_run(self) -> None:
        cfg, dist = self.cfg, self.dist
        # The run folder, and the checkpoint to resume: read and checked (this package, this model,
        # the same schedule) before the folder is created or anything in it is written. A worker
        # restarted by torchrun --max-restarts continues its job's run folder (--resume auto).
        self.elastic = elastic_resume(cfg.out, cfg.run_name, cfg.resume, cfg.fresh)
        self.run_dir, self.resume_from = resolve_run(
            dist,
            out=cfg.out,
            run_name=self.elastic.run_name,
            package=self.package,
            resume=self.elastic.resume,
            fresh=self.elastic.fresh,
            create=False,
        )
        self.config = dataclasses.asdict(cfg)
        self.state: Optional[Dict[str, Any]] = None
        if self.resume_from is not None:
            self.state = load_resume_state(
                self.resume_from,
                package=self.package,
                model=self.net.state_dict(),
                config=self.config,
                world_size=dist.world_size,
            )
            # A changed --lr, --precision, ... would not continue the same run: refused.
            changed = resume_problem(self.state.get("config") or {}, self.config, self.resume_from)
            if changed:
                raise TrainError(changed)
        start_run(dist, self.run_dir, self.package)

    def _resume(self) -> None:
        # Resume: weights, optimizer/scheduler/scaler, EMA, position in the data and RNG states.
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.best: Dict[str, Any] = {"metric": self.cfg.best_metric, "value": None, "epoch": None}
        state, path = self.state, self.resume_from
        if state is None or path is None:
            return
        if state.get("sharded"):  # a DCP checkpoint, resharded to this world size
            load_sharded(path, state, self.net, self.backward, self.ema)
        elif self.sharding is not None:
            raise TrainError(f"{path} was written with --strategy ddp; resume it with --strategy ddp")
        else:
            self.net.load_state_dict(state["model"])
            self.backward.load_state_dict(state["backward"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
        self.start_epoch, self.start_step = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best = state["global_step"], state["best"]
        self.log.info(f"resuming {path} at epoch {self.start_epoch + 1}, step {self.start_step}")
        if self.start_epoch >= self.cfg.epochs:
            self.log.info(f"{path} has finished all {self.cfg.epochs} epochs: nothing to train")

    def _wrap_model(self) -> None:
        cfg, device = self.cfg, self.device
        # DDP averages gradients over ranks during backward(); torch.compile wraps the whole step.
        self.model: nn.Module = self.net
        self.ddp: Optional[DistributedDataParallel] = None
        if self.dist.world_size > 1 and self.sharding is None:
            device_ids = [device.index] if device.type == "cuda" else None
            self.model = self.ddp = DistributedDataParallel(
                self.net, device_ids=device_ids, gradient_as_bucket_view=True
            )
        # --compile-mode is inductor's; other backends take none.
        compile_args: Dict[str, Any] = dict(
            backend=cfg.compile_backend,
            fullgraph=cfg.compile_fullgraph,
            mode=cfg.compile_mode if cfg.compile_backend == "inductor" else None,
        )
        if cfg.compile:
            self.model = torch.compile(self.model, **compile_args)  # type: ignore[assignment]
        self.eval_model: Any = torch.compile(self.net, **compile_args) if cfg.compile else self.net

    def _start_logging(self) -> None:
        cfg, dist, run_dir, state = self.cfg, self.dist, self.run_dir, self.state
        # Logging: metrics.jsonl and MLflow, on rank 0 only. A resumed run drops the records of
        # the steps it trains again, so no step is recorded twice.
        self.metrics_file = MetricsFile(run_dir, enabled=dist.is_main)
        self.mlflow = MlflowLogger(
            cfg.out,
            experiment=cfg.experiment,
            run_name=run_dir.name,
            tracking_uri=cfg.mlflow_uri or None,
            enabled=cfg.mlflow and dist.is_main,
            run_id=state.get("mlflow_run_id") if state is not None else self.elastic.mlflow_run_id,
        )
        # The other ranks learn rank 0's MLflow run: they end it as FAILED should rank 0 be killed.
        self.mlflow.share_run()
        # Where a worker restarted by torchrun --max-restarts continues: <run>/elastic.json.
        note_elastic_run(run_dir, self.mlflow.run_id, is_main=dist.is_main)
        if state is not None or self.elastic.restarts:
            self.metrics_file.drop_after(self.global_step)
        # curves.png in the run folder (and MLflow): loss, metrics and learning rate, redrawn every epoch.
        self.curves = RunCurves(
            run_dir,
            losses=self.losses,
            metrics=self.metrics,
            title=self.package,
            enabled=dist.is_main,
            warn=self.log.warning,
        )
        if dist.is_main:
            (run_dir / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        if not self.mlflow.resumed:
            hyper = compiled_hyperparameters(self.package, self.backward)
            self.mlflow.log_params({**self.config, "package": self.package, "world_size": dist.world_size, **hyper})
            self.mlflow.log_artifact(run_dir / "config.json")
            with resources.as_file(resources.files(self.package) / "manifest.json") as manifest:
                self.mlflow.log_artifact(manifest)
        info = {
            "event": "start",
            "world_size": dist.world_size,
            "train_images": len(self.train_set),
            "val_images": len(self.val_set),
            "classes": len(self.classes),
            "batch_per_rank": self.batch_per_rank,
            "steps_per_epoch": self.steps_per_epoch,
            "images_per_rank_per_epoch": self.steps_per_epoch * self.batch_per_rank,
            "resumed_from": str(self.resume_from) if self.resume_from is not None else None,
            "start_epoch": self.start_epoch,
            "start_step": self.start_step,
        }
        self.metrics_file.write(info)
        self.log.info(
            f"{self.package}: {len(self.train_set)} training / {len(self.val_set)} validation images, "
            f"{len(self.classes)} classes; {dist.world_size} rank(s) x {self.batch_per_rank} images, "
            f"{self.steps_per_epoch} steps per epoch; writing {run_dir}"
        )

    # -- checkpoints -----------------------------------------------------------------------

    def _training_state(self, epoch: int, step_in_epoch: int) -> Dict[str, Any]:
        """All that --resume needs: tensors and plain values, no module./_orig_mod. prefixes."""
        return {
            "format": FORMAT_VERSION,
            "package": self.package,
            "signature": model_signature(self.net.state_dict()),
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "backward": self.backward.state_dict(),  # optimizers, schedulers, grad scaler
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,  # batches of this epoch already trained on
            "global_step": self.global_step,
            "best": self.best,
            "rng": gather_rng_states(),  # one entry per rank; every rank takes part
            "world_size": self.dist.world_size,
            "config": self.config,
            "classes": [str(c) for c in self.classes],
            "mlflow_run_id": self.mlflow.run_id,
        }

    def _save(self, path: Path, checkpoint: Dict[str, Any], optimizers: bool) -> None:
        # FSDP: every rank writes its shards (torch.distributed.checkpoint), then rank 0 the file.
        if self.sharding is not None:
            backward = self.backward if optimizers else None
            save_sharded(path, checkpoint, self.net, backward, is_main=self.dist.is_main)
        elif self.dist.is_main:
            save_checkpoint(path, checkpoint)  # atomic: temporary file, then rename

    def _save_last(self, epoch: int, step_in_epoch: int) -> None:
        self._save(self.run_dir / "last.pt", self._training_state(epoch, step_in_epoch), optimizers=True)
        self.saved_at = self.global_step

    def _save_best(self, epoch: int, record: Dict[str, Any]) -> None:
        best_state = {
            "format": FORMAT_VERSION,
            "package": self.package,
            "signature": model_signature(self.net.state_dict()),
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": epoch + 1,
            "metrics": record,
            "config": self.config,
            "classes": [str(c) for c in self.classes],
        }
        self._save(self.run_dir / "best.pt", best_state, optimizers=False)

    # -- validation ------------------------------------------------------------------------

    def _score(self, outputs: Any, batch: Batch) -> Scores:
        return {
            **self.compute_losses(self.criterion, outputs, batch),
            **self.compute_metrics(self.metric, outputs, batch),
        }

    @torch.no_grad()
    def validate(self, module: nn.Module) -> Dict[str, float]:
        """Loss and metric means over the validation set (each rank scores its shard, one reduction at the end)."""
        was_training = module.training
        module.eval()
        meter = MetricAccumulator(self.device)
        for raw in self.val_loader:
            batch = self.data.val_batch(raw, device=self.device, memory_format=self.memory_format)
            with self.backward.autocast(self.device.type):
                values = self._score(self.forward(module, batch), batch)
            meter.update(values, n=len(batch))
        module.train(was_training)
        return meter.compute()

    # -- the loop --------------------------------------------------------------------------

    def _train(self) -> FitResult:
        cfg, dist = self.cfg, self.dist
        # Per-rank seeds for dropout and drop-path; a resumed run restores the saved states instead.
        seed_everything(cfg.seed, dist.rank)
        if self.state is not None and dist.rank < len(self.state["rng"]):
            set_rng_state(self.state["rng"][dist.rank])
        self.saved_at = self.global_step if self.state is not None else None
        self.train_meter = MetricAccumulator(self.device)  # means over the epoch, kept on the device
        self.window = MetricAccumulator(self.device)  # means over the last log_every steps
        self.stopping = False
        self.resumable: Optional[Tuple[int, int]] = None  # (epoch, step) after the last weight update
        try:
            # Under nccl agreeing on a stop costs a GPU sync, so it is checked every 10 steps there.
            with GracefulStop(check_every=10 if dist.backend == "nccl" else 1) as stop:
                for epoch in range(self.start_epoch, cfg.epochs):
                    self._train_epoch(epoch, stop)
                    if self.stopping:
                        break
                    self._end_epoch(epoch)
        except BadImageError as error:
            # Save what was trained since the last checkpoint when the state is consistent (after a
            # weight update; single process: under DDP the other ranks are not there to take part).
            if self.resumable is not None and dist.world_size == 1:
                self._save_last(*self.resumable)
            self.mlflow.close("FAILED")
            then = "continue with --resume auto" if self.saved_at is not None else "start again"
            held = f"last.pt holds step {self.saved_at}" if self.saved_at is not None else "no checkpoint was saved yet"
            raise TrainError(
                f"{BadImageError.message_of(error)}; {held}. Replace or remove the file (or pass --skip-bad-images), "
                f"then {then}"
            ) from None
        except BaseException as error:
            self.mlflow.close("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        return self._finish()

    def _train_epoch(self, epoch: int, stop: GracefulStop) -> None:
        cfg, steps_per_epoch = self.cfg, self.steps_per_epoch
        # A new shuffle per epoch; a resumed run skips the batches it already trained on.
        first_step = self.start_step if epoch == self.start_epoch else 0
        self.resumable = None
        self.train_loader.sampler.set_epoch(epoch, skip_batches=first_step)
        self.model.train()
        self.train_meter.reset()
        self.epoch_started = time.monotonic()
        progress = Progress(
            steps_per_epoch - first_step,
            f"epoch {epoch + 1}/{cfg.epochs}",
            enabled=self.dist.is_main,
            ci=cfg.ci,
            log_every=cfg.log_every,
        )
        loader = itertools.islice(self.train_loader, steps_per_epoch - first_step)
        batches = self.data.train_batches(
            loader,
            self.prepare_batch,
            device=self.device,
            memory_format=self.memory_format,
            epoch=epoch,
            first_step=first_step,
        )
        for step, batch in enumerate(batches, start=first_step):
            last_in_epoch = step == steps_per_epoch - 1
            updated, values = self._step(batch, last_in_epoch)
            self.global_step += 1
            self.resumable = (epoch, step + 1) if updated and not last_in_epoch else None
            self.train_meter.update(values, n=len(batch))  # no host sync per step
            self.window.update(values, n=len(batch))
            progress.step(values)
            if self.global_step % cfg.log_every == 0:
                self._log_step(epoch)
            # A signal stops at the next weight update (gradients in flight are not saved).
            self.stopping = stop.should_stop()
            periodic = cfg.save_every and self.backward.updates % cfg.save_every == 0
            if updated and (self.stopping or (periodic and not last_in_epoch)):
                self._save_last(epoch, step + 1)
            if updated and self.stopping:
                break
        progress.close()

    def _step(self, batch: Batch, last_in_epoch: bool) -> Tuple[bool, Scores]:
        """One training step: forward and loss under autocast, backward (and maybe the update), EMA."""
        backward = self.backward
        # Gradient accumulation: DDP all-reduces gradients only when the weights update;
        # FSDP neither reduce-scatters nor reshards between micro-steps.
        sync: ContextManager[Any] = contextlib.nullcontext()
        if self.ddp is not None and not backward.will_update(last_in_epoch):
            sync = self.ddp.no_sync()
        elif self.sharding is not None and not backward.will_update(last_in_epoch):
            sync = self.sharding.no_sync(self.net)
        with sync:
            # Mixed precision as the backward template sets it (a no-op without AMP).
            with backward.autocast(self.device.type):
                outputs = self.forward(self.model, batch)
                if self.recipe.splits > 1:  # --aug-splits: the loss on the clean split, plus the JSD term
                    assert self.jsd is not None  # checked with the flags
                    losses, outputs, batch, jsd_term = split_losses(
                        self.compute_losses,
                        self.criterion,
                        outputs,
                        batch,
                        jsd=self.jsd,
                        num_splits=self.recipe.splits,
                        alpha=self.recipe.jsd_alpha,
                    )
                else:
                    losses, jsd_term = self.compute_losses(self.criterion, outputs, batch), None
            updated = self.backward_step(backward, losses, last_in_epoch)
        if updated and self.ema is not None:
            self.ema.update(self.net, step=backward.updates)
        with torch.no_grad():  # with --aug-splits: the metrics of the clean split
            values = {**losses, **self.compute_metrics(self.metric, outputs, batch)}
            if jsd_term is not None:  # train_jsd_consistency: the weighted term inside the backward's loss
                values.setdefault("jsd_consistency", jsd_term.detach())
        return updated, values

    def _log_step(self, epoch: int) -> None:
        # Means over the last log_every steps: train_step_*, apart from the epoch means train_*.
        logged = {f"train_step_{name}": value for name, value in self.window.compute().items()}
        logged.update({f"lr_{name}": lr for name, lr in self.backward.learning_rates.items()})
        logged.update(step_metrics(self.backward))  # grad_norm (before clipping), amp_scale
        self.window.reset()
        self.metrics_file.write({"event": "step", "epoch": epoch + 1, "step": self.global_step, **logged})
        self.mlflow.log_metrics(logged, step=self.global_step)

    def _end_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        # Validation of the raw weights and of their moving average. The epoch's training is
        # complete here: a run stopped in validation resumes with the validation.
        self.resumable = (epoch, self.steps_per_epoch)
        record: Dict[str, Any] = {"event": "epoch", "epoch": epoch + 1, "step": self.global_step}
        record.update({f"train_{name}": value for name, value in self.train_meter.compute().items()})
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:  # --val-every N epochs
            record.update({f"val_{name}": value for name, value in self.validate(self.eval_model).items()})
            if self.ema is not None:
                with averaged_model(self.ema, self.eval_model) as averaged:
                    record.update({f"ema_val_{name}": value for name, value in self.validate(averaged).items()})
        record.update({f"lr_{name}": lr for name, lr in self.backward.learning_rates.items()})
        record["epoch_seconds"] = time.monotonic() - self.epoch_started
        self.backward.end_epoch(epoch, record)  # per-epoch schedulers step here

        # A known name (checked with the flags); train_* is absent after a resume in validation.
        value = record.get(cfg.best_metric)
        best = self.best["value"]
        if value is not None and (best is None or (value > best if cfg.best_mode == "max" else value < best)):
            self.best = {"metric": cfg.best_metric, "value": value, "epoch": epoch + 1}
            self._save_best(epoch, record)
        self._save_last(epoch + 1, 0)
        self.metrics_file.write(record)
        self._draw_curves()
        # The step series already holds this step's learning rates when a step log just ran.
        logged_lr = self.global_step % cfg.log_every == 0
        epoch_metrics = {k: v for k, v in record.items() if k != "event" and not (logged_lr and k.startswith("lr_"))}
        self.mlflow.log_metrics(epoch_metrics, step=self.global_step)
        self.log.info(format_metrics({k: v for k, v in record.items() if k != "event"}))

    def _draw_curves(self) -> None:
        picture = self.curves.draw()
        if picture is not None:
            self.mlflow.log_artifact(picture)

    def _finish(self) -> FitResult:
        dist, run_dir, best, mlflow = self.dist, self.run_dir, self.best, self.mlflow
        seconds = time.monotonic() - self.started
        self._draw_curves()
        best_path = run_dir / "best.pt"
        result = FitResult(run_dir, dict(best), best_path, self.global_step, self.stopping, seconds)
        if self.stopping:
            self.log.info(f"stopped by a signal at step {self.global_step}; continue with --resume auto")
            mlflow.close("KILLED")
            return result
        if dist.is_main and best_path.exists():
            mlflow.log_artifact(best_path)
        mlflow.close("FINISHED")
        self.metrics_file.write({"event": "end", "seconds": seconds, **best, "checkpoint": str(best_path)})
        if dist.is_main:
            top = f"{best['value']:.4f} (epoch {best['epoch']})" if best["value"] is not None else "n/a"
            print(f"done in {seconds:.1f}s: best {best['metric']} {top}; checkpoint {best_path}", flush=True)
            print(
                next_steps(self.package, run_dir, best_path, mlflow.tracking_uri if mlflow.enabled else None),
                flush=True,
            )
        return result
