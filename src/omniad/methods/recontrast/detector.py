"""ReContrast detector ("recontrast"): training with a trainable encoder copy, hard mining, presets."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from omniad.backbone import Backbone
from omniad.methods.distillation import DistillationDetector
from omniad.methods.recontrast.network import RecontrastNet, hard_mining_alpha, recontrast_loss
from omniad.methods.revdist.network import anomaly_map
from omniad.params import Interval
from omniad.registry import register_detector
from omniad.training import batch_indices, train

# paper: the Dinomaly authors' multi-class ReContrast setting with RD's WideResNet-50 depths, whole encoder
#        trainable.
# cpu:   measured on a 2-core shared CPU with tf_efficientnet_lite0 at 256 px: the trainable encoder's
#        forward + backward dominates (~5-10 s per batch of 8 under load, vs ~1 s for the small decoder), so
#        the preset keeps the stem and first returned stage shared with the frozen encoder (no backward
#        through the 64x64 maps), one residual block per stage, batch 8 and 200 iterations. What it costs is
#        in benchmarks/results/rdrc.md.
RECONTRAST_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "iterations": 5000,
        "train_batch_size": 16,
        "bottleneck_blocks": 3,
        "decoder_blocks": (6, 4, 3),
        "encoder_frozen_stages": 0,
    },
    "cpu": {
        "iterations": 200,
        "train_batch_size": 8,
        "bottleneck_blocks": 1,
        "decoder_blocks": (1, 1, 1),
        "encoder_frozen_stages": 1,
    },
}


def freeze_leading_stages(encoder: Backbone, stages: int) -> None:
    """Stop gradients to the stem and the layers up to and including the encoder's ``stages``-th returned
    stage (timm's feature module order), so those layers stay identical to the frozen encoder's."""
    if stages <= 0:
        return
    modules = encoder.model.feature_info.module_name()
    if stages > len(modules):
        raise ValueError(f"encoder_frozen_stages={stages} but the encoder returns only {len(modules)} stages")
    prefix = modules[stages - 1] + "."
    named = list(encoder.model.named_parameters())
    last = max((i for i, (name, _) in enumerate(named) if name.startswith(prefix)), default=-1)
    if last < 0:
        raise ValueError(f"cannot find the parameters of the encoder stage {modules[stages - 1]!r}")
    for _, param in named[: last + 1]:
        param.requires_grad_(False)


@register_detector("recontrast")
class Recontrast(DistillationDetector):
    """ReContrast: anomaly detection via contrastive reconstruction (Guo et al., NeurIPS 2023).

    Reverse Distillation with two encoders: a frozen pretrained one and a trainable copy (small learning rate,
    BatchNorm kept in eval mode). One bottleneck and decoder read both; the decoder run from the trainable
    encoder's maps must rebuild the frozen encoder's maps and vice versa. The loss is the global cosine
    distance between each flattened encoder map and its reconstruction, with hard mining: points reconstructed
    better than mean + alpha x std have their gradient scaled by ``hm_factor``, alpha ramping from
    ``hm_alpha_start`` to ``hm_alpha_end`` over the first ``hm_warmup`` share of the iterations. The anomaly
    map is the sum of the per-location cosine distances over both branches and all stages, up-sampled and
    blurred (sigma 4); the image score is the mean of the top 1% of the map.

    The trainable encoder cannot train on a feature cache alone: every step runs it forward and backward on the
    images. What is cached (``features``) is the images themselves with the frozen encoder's maps (on the CPU,
    float32: about 0.8 + 0.6 MB per 256-px image with lite0).
    ``encoder_frozen_stages`` (the "cpu" preset) also saves the backward pass through the early
    high-resolution layers.

    Args:
        encoder_lr: learning rate of the trainable encoder (1e-5).
        amsgrad: AdamW's AMSGrad variant (the multi-class setting uses it).
        lr_decay_at: share of the iterations after which all learning rates are multiplied by ``lr_decay``.
        lr_decay: that factor (0.2).
        hm_alpha_start: hard-mining alpha at the first iteration (-3: almost nothing is down-weighted).
        hm_alpha_end: alpha after the warm-up (1: points below mean + 1 std are down-weighted).
        hm_warmup: share of the iterations over which alpha ramps up (0.1).
        hm_factor: gradient factor of the easy points (0: ignored).
        encoder_frozen_stages: returned encoder stages (with everything before them) kept frozen in the
            trainable copy (paper 0: all trainable; cpu 1).
        **kwargs: see ``DistillationDetector`` (preset, stages, iterations, train_batch_size, lr, betas,
            weight_decay, widths and depths) and ``BaseDetector``.

    Attributes:
        backbone_: the frozen ``Backbone``.
        net_: the trained ``RecontrastNet`` (its ``encoder`` is the trained encoder copy).
        loss_history_: training loss of every iteration (not saved).
    """

    # settings small enough for the contract test on the tiny synthetic set (seconds on a 2-core CPU)
    test_params: dict[str, Any] = {"preset": "cpu", "iterations": 20}

    presets = RECONTRAST_PRESETS
    test_params: dict[str, Any] = {"preset": "cpu", "iterations": 20}
    constraints = {
        "encoder_lr": Interval(0.0, None),
        "lr_decay_at": Interval(0.0, 1.0),
        "lr_decay": Interval(0.0, 1.0, low_open=True),
        "hm_warmup": Interval(0.0, 1.0),
        "hm_factor": Interval(0.0, 1.0),
        "encoder_frozen_stages": Interval(0, None, integer=True),
    }

    def __init__(
        self,
        *,
        encoder_lr: float = 1e-5,
        amsgrad: bool = True,
        lr_decay_at: float = 0.8,
        lr_decay: float = 0.2,
        hm_alpha_start: float = -3.0,
        hm_alpha_end: float = 1.0,
        hm_warmup: float = 0.1,
        hm_factor: float = 0.0,
        encoder_frozen_stages: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encoder_lr = encoder_lr
        self.amsgrad = amsgrad
        self.lr_decay_at = lr_decay_at
        self.lr_decay = lr_decay
        self.hm_alpha_start = hm_alpha_start
        self.hm_alpha_end = hm_alpha_end
        self.hm_warmup = hm_warmup
        self.hm_factor = hm_factor
        self.encoder_frozen_stages = encoder_frozen_stages

    def _make_net(self) -> RecontrastNet:
        r = self.resolved_
        encoder = copy.deepcopy(self.backbone_)
        encoder.requires_grad_(True)
        freeze_leading_stages(encoder, r.encoder_frozen_stages)
        return RecontrastNet(encoder, self.backbone_.channels, self.backbone_.strides, **self.decoder_settings())

    def features(self, images: Tensor) -> list[Tensor]:
        """The images themselves (the trainable encoder reads them) and the frozen encoder's maps."""
        return [images, *self.backbone_(images)]

    def train_features(self, features: list[Tensor]) -> None:
        r = self.resolved_
        self.net_ = self._make_net().to(self.device_)
        encoder_params = [p for p in self.net_.encoder.parameters() if p.requires_grad]
        encoder_ids = {id(p) for p in self.net_.encoder.parameters()}
        other_params = [p for p in self.net_.parameters() if id(p) not in encoder_ids]
        groups = [{"params": other_params}]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": r.encoder_lr})
        optimizer = torch.optim.AdamW(groups, lr=r.lr, betas=r.betas, weight_decay=r.weight_decay, amsgrad=r.amsgrad)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[int(r.iterations * r.lr_decay_at)], gamma=r.lr_decay
        )
        generator = torch.Generator().manual_seed(self.seed)

        def loss_of_batch(step: int, index: Tensor, model: nn.Module) -> Tensor:
            alpha = hard_mining_alpha(step, r.iterations, r.hm_alpha_start, r.hm_alpha_end, r.hm_warmup)
            images, *frozen = (f[index].to(self.device_, torch.float32) for f in features)
            targets, recons = model(images, frozen)
            return recontrast_loss(targets, recons, alpha, r.hm_factor)

        batches = batch_indices(features[0].shape[0], r.train_batch_size, r.iterations, generator)
        self.loss_history_: list[float] = train(
            self.net_, optimizer, batches, loss_of_batch, total=r.iterations, desc="recontrast training",
            progress=self.progress, scheduler=scheduler,
        )

    def score_features(self, features: list[Tensor]) -> Tensor:
        images, *frozen = features
        targets, recons = self.net_(images, frozen)
        return anomaly_map(targets, recons, tuple(images.shape[-2:]))

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net_}

    def build(self, meta: dict[str, Any]) -> None:
        self.net_ = self._make_net().to(self.device_)
