"""Compress-then-fine-tune with stock ``nnUNetv2_train`` (SPEC §4, Algorithm 2), and the control.

    nnUNetv2_train 4 3d_fullres 0 -p nnUNetPlansSmall -tr nnUNetTrainerMedslim \
        -pretrained_weights path/to/checkpoint_final.pth -device cpu

Seam (nnU-Net 2.8): ``run_training.py`` calls ``trainer.initialize()`` (network + optimizer),
then ``load_pretrained_weights(trainer.network, ...)``, which insists on the plans' original
architecture and skips the segmentation heads, then ``run_training()`` → ``on_train_start()``.
So ``initialize()`` builds the ORIGINAL network, loads all pretrained tensors itself (heads
included; mismatches fail here) and builds no optimizer; ``on_train_start()`` compresses the
network with medslim, swaps in plans naming ``medslim.network.CompressedUNet`` + spec (saved as
the results folder's plans.json), builds the optimizer on the compressed parameters, saves
``checkpoint_compressed.pth`` (compressed, not yet fine-tuned) and only then trains. With
``--c``/``--val``, ``initialize()`` reads the saved plans and rebuilds the compressed network
before nnU-Net loads the checkpoint. ``build_network_architecture`` rebuilds from plans, so
stock ``nnUNetv2_predict`` loads the results (with ``nnUNet_extTrainer`` set, as for training).

Distillation (``kd_weight`` > 0): the teacher is the ``-pretrained_weights`` network itself,
frozen in eval mode, run on the same augmented batch; nnU-Net's loss is wrapped in
``medslim.finetune.distill.DistillationLoss``. ``init="scratch"`` re-initialises the
(compressed) network after compression: the train-from-scratch control.

Regularisers (``regularizer`` ``lobster``/``serene``, ``medslim.finetune.sparsify``): hooked to the
optimizer (shrinkage before each step, pinned zeros after); a threshold step at validation-loss
plateaus and at the end; ``fold_X/medslim_regularizer.json`` reports what was zeroed. SeReNe then
removes the zeroed channels physically and rewrites plans.json with the spec (kept channels), so
stock ``nnUNetv2_predict`` rebuilds the final network (``checkpoint_best.pth``, of the unpruned
architecture, is deleted).

DPRP (``dprp``, ``medslim.finetune.dprp``): at the start every eligible conv becomes full-rank
trained SVD factors and nnU-Net's loss is wrapped in ``DPRPLoss``; ranks are cut every
``dprp_cut_every`` epochs (new optimizer when a rank shrank) and at the end, where the factors
are written as ``TuckerConv`` layers and plans.json is rewritten with the spec (ranks), so stock
``nnUNetv2_predict`` rebuilds the final network; ``fold_X/medslim_dprp.json`` reports the ranks.
Checkpoints written before the end hold SVD factors: ``--c`` is refused, ``checkpoint_best.pth``
is deleted at the end.

Settings: the trainer variant's fixed keys, ``MEDSLIM_CONFIG`` (a JSON file, see
``medslim.finetune.config``), ``MEDSLIM_EPOCHS``/``MEDSLIM_ITERS``/``MEDSLIM_SEED``; the resolved
config is written to ``medslim_config.json`` in the results folder.
"""
import json
import os
import random
import sys
from os.path import isfile, join
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medslim.errors import MedslimError
from medslim.finetune.config import resolve_config
from medslim.finetune.distill import DistillationLoss, frozen_copy
from medslim.finetune.regularize import plateaued
from medslim.network import COMPRESSED_CLASS, is_compressed
from medslim.score.registry import NEEDS_CALIBRATION
from medslim.finetune.nnunet import (
    build_compressed,
    check_rebuild,
    compress_live,
    compressed_plans,
    load_full_weights,
    make_optimizer,
    pretrained_weights_arg,
    reinitialize,
)

_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


class nnUNetTrainerMedslim(nnUNetTrainer):
    """Compress (default DF 0.3, ρ 0.5, HVS, site ``outer``) the ``-pretrained_weights`` model,
    then fine-tune with the thesis schedule (Adam, lr 1e-4, 4 × 50 = 200 updates), deep
    supervision on. Variants fix keys in ``medslim_fixed``."""

    medslim_fixed: ClassVar[dict] = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.medslim_config = resolve_config(self.medslim_fixed, os.environ.get("MEDSLIM_CONFIG"), os.environ)
        self.medslim_config.check_plans(plans, configuration)
        self._medslim_resume = bool(plans.get("continue_training", False)) or "--val" in sys.argv
        self._medslim_pretrained = pretrained_weights_arg(sys.argv, os.environ)
        if not self._medslim_resume and self._medslim_pretrained is None:
            raise MedslimError(f"{type(self).__name__} fine-tunes a trained model: pass -pretrained_weights "
                               "<checkpoint_final.pth of the original model>")
        if self._medslim_pretrained is not None and not isfile(self._medslim_pretrained):
            raise MedslimError(f"-pretrained_weights {self._medslim_pretrained} does not exist")
        seed = self.medslim_config.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        cfg = self.medslim_config
        self.initial_lr, self.weight_decay = cfg.lr, cfg.weight_decay
        self.num_epochs, self.num_iterations_per_epoch = cfg.epochs, cfg.iterations
        self.num_val_iterations_per_epoch, self.save_every = cfg.val_iterations, cfg.save_every
        self._medslim_pending = False
        self._medslim_report: dict = {}
        self._medslim_teacher: torch.nn.Module | None = None
        self._medslim_loaders = None
        self._medslim_original = (self.plans_manager, self.configuration_manager)
        self._medslim_reg = None
        self._medslim_reg_losses: list[float] = []
        self._medslim_reg_report: dict = {}
        self._medslim_dprp_full: dict[str, int] = {}
        self._medslim_dprp_cuts: list[dict] = []

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """The plans' network; ``CompressedUNet`` rebuilt from its spec when the plans name it."""
        if configuration_manager.network_arch_class_name == COMPRESSED_CLASS:
            return build_compressed(configuration_manager.network_arch_init_kwargs, num_input_channels,
                                    num_output_channels, enable_deep_supervision)
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    def _get_deep_supervision_scales(self):
        """nnU-Net reads the strides from ``arch_kwargs``; a compressed plans keeps them in ``base_arch_kwargs``."""
        if not self.enable_deep_supervision or self.configuration_manager.network_arch_class_name != COMPRESSED_CLASS:
            return super()._get_deep_supervision_scales()
        strides = self.configuration_manager.network_arch_init_kwargs["base_arch_kwargs"]["strides"]
        return [list(i) for i in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]

    def _bare_network(self) -> torch.nn.Module:
        net = self.network.module if self.is_ddp else self.network
        return getattr(net, "_orig_mod", net)

    def _resuming_from_checkpoint(self) -> bool:
        return self._medslim_resume and any(isfile(join(self.output_folder, c)) for c in _CHECKPOINTS)

    def initialize(self):
        if self.was_initialized:
            return super().initialize()  # nnU-Net's own error
        cfg = self.medslim_config
        if self._resuming_from_checkpoint():
            if cfg.dprp and "--val" not in sys.argv:
                raise MedslimError("DPRP cannot continue a run (--c): its checkpoints before the end hold SVD factors "
                                   "that no plans rebuild; start the run again")
            if not cfg.can_continue and "--val" not in sys.argv:
                raise MedslimError("cannot continue a run (--c) with a regulariser or with stages: the checkpoints "
                                   "do not hold their state; start the run again")
            saved = join(self.output_folder_base, "plans.json")
            if cfg.compress or cfg.dprp:
                if not isfile(saved):
                    raise MedslimError(f"cannot continue: {saved} (plans of the compressed network) is missing")
                plans = json.loads(Path(saved).read_text())
                if not is_compressed(plans["configurations"][self.configuration_name]["architecture"]):
                    raise MedslimError(f"cannot continue: {saved} does not describe a medslim-compressed network")
                self.plans_manager = PlansManager(plans)
                self.configuration_manager = self.plans_manager.get_configuration(self.configuration_name)
            return super().initialize()
        if self._medslim_pretrained is None:
            raise MedslimError(f"no checkpoint to continue from in {self.output_folder} and no -pretrained_weights")
        if cfg.compress and self.is_ddp:
            raise MedslimError("compress-then-fine-tune runs on one device; multi-GPU (DDP) is not supported")
        self._medslim_pending = cfg.compress
        super().initialize()  # the original network; no optimizer while compression is pending
        load_full_weights(self._bare_network(), self._medslim_pretrained)
        self.print_to_log_file(f"medslim: loaded all tensors of {self._medslim_pretrained}")

    def _build_loss(self):
        loss = super()._build_loss()
        cfg = self.medslim_config
        if cfg.kd_weight == 0:
            return loss
        weights = getattr(loss, "weight_factors", None)
        return DistillationLoss(loss, cfg.kd_weight, cfg.kd_temperature, weights, cfg.kd_levels)

    def _build_teacher(self) -> torch.nn.Module:
        """The original network with the pretrained weights, frozen (the KD teacher)."""
        plans_manager, configuration_manager = self._medslim_original
        net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, self.num_input_channels,
                                                       self.label_manager.num_segmentation_heads,
                                                       self.enable_deep_supervision)
        path = self._medslim_pretrained
        record = join(self.output_folder_base, "medslim_config.json")
        if path is None and isfile(record):
            path = json.loads(Path(record).read_text()).get("pretrained_weights")
        if path is None:
            raise MedslimError("distillation needs the original model: pass -pretrained_weights")
        load_full_weights(net, path)
        cfg = self.medslim_config
        self.print_to_log_file(f"medslim: distilling from {path} (λ {cfg.kd_weight:g}, T {cfg.kd_temperature:g}, "
                               f"levels {cfg.kd_levels})")
        return frozen_copy(net).to(self.device)

    def train_step(self, batch: dict) -> dict:
        if self._medslim_teacher is None:
            return super().train_step(batch)
        with torch.no_grad():
            self.loss.teacher_output = self._medslim_teacher(batch["data"].to(self.device, non_blocking=True))
        try:
            return super().train_step(batch)
        finally:
            self.loss.teacher_output = None

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.medslim_config.final_validation:
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file("medslim: final validation skipped (final_validation: false)")

    def get_dataloaders(self):
        """Loaders built early for calibration batches are handed to nnU-Net, not built twice."""
        if self._medslim_loaders is not None:
            loaders, self._medslim_loaders = self._medslim_loaders, None
            return loaders
        return super().get_dataloaders()

    def _calibration_batches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``calibration_batches`` augmented training batches: data ``[N, C, *patch]`` and
        full-resolution labels ``[N, *patch]`` (data-aware criteria)."""
        loader = getattr(self, "dataloader_train", None)
        if loader is None:
            self._medslim_loaders = super().get_dataloaders()
            loader = self._medslim_loaders[0]
        batches = [next(loader) for _ in range(self.medslim_config.calibration_batches)]
        data = torch.cat([torch.as_tensor(b["data"]) for b in batches])
        target = [b["target"][0] if isinstance(b["target"], list) else b["target"] for b in batches]
        return data, torch.cat([torch.as_tensor(t)[:, 0].long() for t in target])

    def _do_i_compile(self) -> bool:
        return not self._medslim_pending and super()._do_i_compile()

    def configure_optimizers(self):
        if self._medslim_pending:
            return None, None
        return make_optimizer(self.network.parameters(), self.medslim_config)

    def _medslim_compress(self) -> None:
        """Compress the pretrained network, switch plans, build the optimizer."""
        cfg = self.medslim_config
        input_shape = [1, self.num_input_channels, *self.configuration_manager.patch_size]
        calibration = self._calibration_for(cfg.stage_compression())
        net, report = compress_live(self._bare_network().cpu(), cfg, input_shape, *calibration)
        self._adopt(reinitialize(net) if cfg.init == "scratch" else net)
        self._medslim_report = report
        self.print_to_log_file(f"medslim: compressed {report['parameters_before']} → "
                               f"{report['parameters_after']} parameters ({cfg.compression().to_dict()})")

    def _calibration_for(self, stage) -> tuple:
        """Calibration batches when ``stage`` scores channels with a data-aware criterion, else ``(None, None)``."""
        data_aware = stage.prunes and stage.criterion in NEEDS_CALIBRATION  # a ratio or the α rule
        return self._calibration_batches() if data_aware else (None, None)

    def _adopt(self, net: torch.nn.Module) -> dict:
        """Train ``net`` (a ``CompressedUNet``) from now on: plans naming its spec (checked to
        rebuild it), the network on the device, a new optimizer. Returns the plans."""
        plans = compressed_plans(self._medslim_original[0].plans, self.configuration_name, net.spec)
        check_rebuild(net, plans, self.configuration_name, self.num_input_channels,
                      self.label_manager.num_segmentation_heads)
        self.plans_manager = PlansManager(plans)
        self.configuration_manager = self.plans_manager.get_configuration(self.configuration_name)
        self.network = net.to(self.device)
        self._medslim_pending = False
        if self._do_i_compile():
            self.network = torch.compile(self.network)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        return plans

    def _save_plans(self, plans: dict) -> None:
        """Rewrite the results folder's plans.json (the network changed after nnU-Net wrote it)."""
        if self.local_rank == 0:
            with open(join(self.output_folder_base, "plans.json"), "w") as f:
                json.dump(plans, f, indent=4, sort_keys=False)

    def on_epoch_start(self):
        self._medslim_next_stage()
        super().on_epoch_start()

    def _medslim_next_stage(self) -> None:
        """Iterative compression (``steps`` > 1): at a stage's first epoch, compress the live
        network further, switch plans (plans.json rewritten), rebuild the optimizer."""
        cfg = self.medslim_config
        net = self._bare_network()
        if not cfg.compress or cfg.steps == 1 or not hasattr(net, "spec"):
            return
        done = len(net.spec.provenance.get("stages", [None]))
        if done >= cfg.steps or self.current_epoch < cfg.stage_epochs()[done]:
            return
        from medslim.recompress import compress_further

        stage = cfg.stage_compression()
        calibration = self._calibration_for(stage)
        input_shape = [1, self.num_input_channels, *self.configuration_manager.patch_size]
        ds = net.decoder.deep_supervision
        net.decoder.deep_supervision = False
        try:
            new = compress_further(net.cpu(), stage, cfg.df ** (1 / cfg.steps), input_shape, *calibration)
        finally:
            net.decoder.deep_supervision = ds
        new.decoder.deep_supervision = ds
        self._save_plans(self._adopt(new.train()))
        from medslim.measure import count_parameters

        self.print_to_log_file(f"medslim: stage {done + 1}/{cfg.steps} at epoch {self.current_epoch}: "
                               f"{count_parameters(net)} → {count_parameters(new)} parameters")

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        compressing = self._medslim_pending
        cfg = self.medslim_config
        if compressing:
            self._medslim_compress()
        elif cfg.init == "scratch" and not self._resuming_from_checkpoint():
            reinitialize(self._bare_network())
        if cfg.kd_weight > 0:
            self._medslim_teacher = self._build_teacher()
        super().on_train_start()  # writes plans.json from self.plans_manager (compressed)
        if cfg.regularizer != "none":
            from medslim.finetune.sparsify import attach, make_regularizer

            self._medslim_reg = make_regularizer(self._bare_network(), cfg.regularizer, cfg.reg_lambda,
                                                 self.num_input_channels, cfg.prune_stem)
            attach(self.optimizer, self._medslim_reg)
            self.print_to_log_file(f"medslim: {cfg.regularizer} regulariser, λ {cfg.reg_lambda:g}, "
                                   f"tolerance {cfg.reg_tolerance:g}, patience {cfg.reg_patience}")
        if cfg.dprp:
            self._medslim_dprp_start()
        # with stages, or SeReNe's channel removal, it would not match the final plans
        if compressing and cfg.steps == 1 and cfg.regularizer != "serene":
            # saved only now: nnU-Net sets inference_allowed_mirroring_axes while building the
            # dataloaders, and a checkpoint saved earlier predicts without test-time mirroring
            os.makedirs(self.output_folder, exist_ok=True)
            self.save_checkpoint(join(self.output_folder, "checkpoint_compressed.pth"))
        path = join(self.output_folder_base, "medslim_config.json")
        record = {"trainer": type(self).__name__, "pretrained_weights": self._medslim_pretrained,
                  "continued": self._medslim_resume, "config": self.medslim_config.to_dict(),
                  "compression_report": self._medslim_report or None}
        if self._medslim_resume and isfile(path):  # keep what the first run recorded
            first = json.loads(Path(path).read_text())
            record.update(pretrained_weights=first.get("pretrained_weights"),
                          compression_report=first.get("compression_report"))
        if self.local_rank == 0:
            with open(path, "w") as f:
                json.dump(record, f, indent=1)

    def on_train_epoch_start(self):
        from medslim.finetune.sparsify import SereneRegularizer

        if isinstance(self._medslim_reg, SereneRegularizer):
            self._medslim_reg.refresh(self._bare_network(), self._calibration_batches()[0])
            s = torch.cat(list(self._medslim_reg.sensitivity.values()))
            self.print_to_log_file(f"medslim: SeReNe sensitivity median {s.median():.3g}, "
                                   f"{int((s < 1).sum())}/{s.numel()} channels insensitive (S < 1)")
        super().on_train_epoch_start()

    def _medslim_dprp_start(self) -> None:
        """Factorise the eligible convs into full-rank SVD factors; wrap the loss; new optimizer."""
        from medslim.finetune.dprp import DPRPLoss, DPRPWeights, factorize, svd_layers

        cfg = self.medslim_config
        net = factorize(self._bare_network().cpu())
        self.network = net.to(self.device)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self._medslim_dprp_full = {n: m.rank for n, m in svd_layers(net).items()}
        weights = DPRPWeights(cfg.dprp_orth, cfg.dprp_sort, cfg.dprp_comp, cfg.dprp_epsilon)
        self.loss = DPRPLoss(self.loss, net, weights)
        self.print_to_log_file(f"medslim: DPRP factorised {len(self._medslim_dprp_full)} convs at full rank "
                               f"(weights {weights}, cut every {cfg.dprp_cut_every} epochs)")

    def _medslim_dprp_cut(self, why: str) -> None:
        """Cut every SVD layer's rank (``dprp_epsilon``); a new optimizer if a rank shrank."""
        from medslim.finetune.dprp import cut_network

        cut = cut_network(self._bare_network(), self.medslim_config.dprp_epsilon)
        self._medslim_dprp_cuts.append({"epoch": self.current_epoch, "why": why,
                                        "cut": {k: list(v) for k, v in cut.items()}})
        if cut:
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
        terms = ", ".join(f"{k} {v:.3g}" for k, v in getattr(self.loss, "last", {}).items())
        self.print_to_log_file(f"medslim: DPRP cut ({why}, epoch {self.current_epoch}): {len(cut)} layers shrank, "
                               f"{sum(b - a for b, a in cut.values())} components removed; last terms: {terms}")

    def _medslim_dprp_finish(self) -> None:
        """The final cut, then TuckerConv layers + spec, plans.json rewritten; ``medslim_dprp.json``."""
        from dataclasses import asdict

        from medslim.finetune.dprp import finalize
        from medslim.measure import count_parameters
        from medslim.network import CompressedUNet

        cfg = self.medslim_config
        self._medslim_dprp_cut("end")
        net = self._bare_network().cpu()
        before = count_parameters(net)
        final, spec, layers = finalize(net, self._medslim_dprp_full, cfg.dprp_guard,
                                       {"epsilon": cfg.dprp_epsilon, "guard": cfg.dprp_guard})
        self._save_plans(self._adopt(CompressedUNet.wrap(final, spec).train()))
        self.loss = self.loss.inner
        best = join(self.output_folder, "checkpoint_best.pth")
        if self.local_rank == 0 and isfile(best):
            os.remove(best)  # SVD factors: plans.json does not rebuild them
        report = {"parameters_svd": before, "parameters_after": count_parameters(final),
                  "layers": {k: asdict(v) for k, v in layers.items()}, "cuts": self._medslim_dprp_cuts}
        self.print_to_log_file(f"medslim: DPRP wrote {len(spec.ranks)} TuckerConv layers, "
                               f"{sum(v.written_as == 'dense' for v in layers.values())} dense; "
                               f"{report['parameters_after']} parameters")
        if self.local_rank == 0:
            os.makedirs(self.output_folder, exist_ok=True)
            with open(join(self.output_folder, "medslim_dprp.json"), "w") as f:
                json.dump(report, f, indent=1)

    def on_epoch_end(self):
        cfg = self.medslim_config
        last = self.current_epoch == self.num_epochs - 1  # the end cuts and thresholds anyway
        if cfg.dprp and not last and (self.current_epoch + 1) % cfg.dprp_cut_every == 0:
            self._medslim_dprp_cut("interval")
        if self._medslim_reg is not None:
            self._medslim_reg_losses.append(float(self.logger.get_value("val_losses", step=-1)))
            if not last and plateaued(self._medslim_reg_losses, self.medslim_config.reg_patience):
                self._medslim_threshold("plateau")
                self._medslim_reg_losses = []
        super().on_epoch_end()

    def _medslim_threshold(self, why: str) -> None:
        """Zero what lies below the threshold keeping nnU-Net's validation loss (on fixed
        ``val_iterations`` batches) within ``reg_tolerance``."""
        batches = [next(self.dataloader_val) for _ in range(self.num_val_iterations_per_epoch)]

        def val_loss() -> float:
            self.network.eval()
            with torch.no_grad():
                return float(np.mean([self.validation_step(b)["loss"] for b in batches]))

        result = self._medslim_reg.threshold(val_loss, self.medslim_config.reg_tolerance)
        self.network.train()
        zeroed = self._medslim_reg.history[-1]
        self.print_to_log_file(f"medslim: {self.medslim_config.regularizer} threshold ({why}, epoch "
                               f"{self.current_epoch}) {result.threshold:.4g}: val loss {result.base_loss:.4f} → "
                               f"{result.loss:.4f} (budget {result.budget:.4f}); "
                               + ", ".join(f"{k} {v}" for k, v in zeroed.items() if k.startswith(("zeros", "channels"))))

    def _medslim_remove_channels(self) -> dict:
        """SeReNe's end: the network without its zeroed channels, as a spec in plans.json;
        returns what it removed and the largest output difference to the masked network."""
        from medslim.measure import count_parameters
        from medslim.network import CompressedUNet

        net = self._bare_network()
        pruned, spec = self._medslim_reg.remove(net)
        data = torch.as_tensor(next(self.dataloader_val)["data"]).to(self.device)
        with torch.no_grad():
            masked, removed = net.eval()(data), pruned.eval()(data)
        first = (lambda o: o[0] if isinstance(o, (list, tuple)) else o)
        diff = float((first(masked) - first(removed)).abs().max())
        before = count_parameters(net)
        self._save_plans(self._adopt(CompressedUNet.wrap(pruned, spec).train()))
        best = join(self.output_folder, "checkpoint_best.pth")
        if self.local_rank == 0 and isfile(best):
            os.remove(best)  # of the unpruned architecture: plans.json no longer rebuilds it
        report = {"parameters_before": before, "parameters_after": count_parameters(pruned),
                  "max_abs_output_difference": diff, "kept": {k: len(v) for k, v in spec.kept.items()}}
        self.print_to_log_file(f"medslim: SeReNe removed {self._medslim_reg.dead_count()} channels: "
                               f"{before} → {report['parameters_after']} parameters (output change {diff:.2g})")
        return report

    def on_train_end(self):
        if self.medslim_config.dprp:
            self._medslim_dprp_finish()
        reg = self._medslim_reg
        if reg is not None:
            from medslim.finetune.sparsify import SereneRegularizer

            self._medslim_threshold("end")
            report = reg.report()
            if isinstance(reg, SereneRegularizer):
                report["removal"] = self._medslim_remove_channels()
            else:
                self.print_to_log_file(f"medslim: LOBSTER zeroed {report['zeros']} of {report['weights']} "
                                       f"convolution weights ({100 * report['sparsity']:.2f} %); unstructured "
                                       "sparsity does not make the dense network faster")
            if self.local_rank == 0:
                os.makedirs(self.output_folder, exist_ok=True)
                with open(join(self.output_folder, "medslim_regularizer.json"), "w") as f:
                    json.dump(report, f, indent=1)
        super().on_train_end()


class nnUNetTrainerMedslimControl(nnUNetTrainerMedslim):
    """The control: the identical fine-tune on the uncompressed pretrained model."""

    medslim_fixed: ClassVar[dict] = {"compress": False}


class nnUNetTrainerMedslimKD(nnUNetTrainerMedslim):
    """Compress, then fine-tune with distillation from the original (λ = 1, T = 1, every
    deep-supervision level) on nnU-Net's own recipe (SGD, lr 1e-2, poly, 1,000 updates)."""

    medslim_fixed: ClassVar[dict] = {"schedule": "nnunet", "kd_weight": 1.0}


class nnUNetTrainerMedslimKDControl(nnUNetTrainerMedslim):
    """The control of ``nnUNetTrainerMedslimKD``: the identical fine-tune (distillation from
    itself included) on the uncompressed model."""

    medslim_fixed: ClassVar[dict] = {"schedule": "nnunet", "kd_weight": 1.0, "compress": False}


class nnUNetTrainerMedslimScratch(nnUNetTrainerMedslim):
    """The compressed architecture (same ranks and kept channels) trained from random init
    with nnU-Net's own recipe (1,000 updates; MEDSLIM_EPOCHS=40 gives the original's 2,000)."""

    medslim_fixed: ClassVar[dict] = {"schedule": "nnunet", "init": "scratch"}


class nnUNetTrainerMedslimWeber(nnUNetTrainerMedslim):
    """Weber et al. 2025 schedule: AdamW, lr 1e-5, 50 epochs × 250 iterations, rank_min 8."""

    medslim_fixed: ClassVar[dict] = {"schedule": "weber"}


class nnUNetTrainerMedslimWeberControl(nnUNetTrainerMedslim):
    """The Weber et al. schedule on the uncompressed model."""

    medslim_fixed: ClassVar[dict] = {"schedule": "weber", "compress": False}


class nnUNetTrainerMedslimLOBSTER(nnUNetTrainerMedslim):
    """LOBSTER (unstructured, loss-based sensitivity) on the uncompressed pretrained model,
    thesis schedule; zeroed weights are reported, not removed."""

    medslim_fixed: ClassVar[dict] = {"regularizer": "lobster", "compress": False}


class nnUNetTrainerMedslimSeReNe(nnUNetTrainerMedslim):
    """SeReNe (structured, output sensitivity of channels) on the uncompressed pretrained model,
    thesis schedule; the zeroed channels are removed and written as a spec."""

    medslim_fixed: ClassVar[dict] = {"regularizer": "serene", "compress": False}


class nnUNetTrainerMedslimDPRP(nnUNetTrainerMedslim):
    """DPRP (Sharma et al. 2025) on the uncompressed pretrained model, thesis schedule:
    trained SVD factors with orthogonality/sorting/compression losses, ranks cut every epoch,
    written as TuckerConv layers + spec."""

    medslim_fixed: ClassVar[dict] = {"dprp": True, "compress": False}


def _grid_name(df: float, rho: float) -> str:
    return f"nnUNetTrainerMedslim_DF{str(df).replace('.', 'p')}_P{str(rho).replace('.', 'p')}"


# The thesis grid (thesis schedule, HVS, site outer): nnUNetTrainerMedslim_DF0p3_P0p5 etc.
for _df in (0.3, 0.5, 0.7, 0.9):
    for _rho in (0.0, 0.3, 0.5, 0.7):
        _name = _grid_name(_df, _rho)
        globals()[_name] = type(_name, (nnUNetTrainerMedslim,), {
            "medslim_fixed": {"df": _df, "prune_ratio": _rho},
            "__doc__": f"DF {_df}, ρ {_rho}, HVS, thesis schedule.",
            "__module__": __name__})
del _df, _rho, _name
