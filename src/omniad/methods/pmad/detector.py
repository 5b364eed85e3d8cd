"""PMAD (Yao et al., AAAI 2023, "One-for-All: Proposal Masked Cross-Class Anomaly Detection").

Fit: a frozen backbone runs once over the training images; a k-means visual tokenizer (the stand-in for the DALL-E
dVAE, see ``tokenizer.py``) turns every patch into a token; nominal prototypes are sub-sampled from the normal
patch features; ``PMADNet`` learns to predict the tokens of masked patches (combinational random + block-wise
masks) from the visible ones.

Score: prototype-guided proposal masking hides the top m% patches by distance to the nearest prototype, the net
predicts their token distribution from the context, and the patch score is the cross-entropy of the observed
token under it, weighted by the patch's prototype distance (both as PMAD's released code does; the paper's
formula, the entropy of the distribution, unweighted, is selectable).
Further rounds hide the next m% bands of the same ranking, so every patch is predicted from its context exactly
once. Map up-sampled to the image, Gaussian sigma 4, image score = top-1% mean.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniad.backbone import Backbone
from omniad.cluster import kmeans
from omniad.features import extract_features, fuse_stages
from omniad.methods.base import BaseDetector, resolve_preset
from omniad.methods.patchcore import greedy_coreset
from omniad.methods.pmad.masking import INFERENCE_MASKINGS, TRAIN_MASKINGS, inference_rounds, training_mask
from omniad.methods.pmad.network import PMADNet, token_cross_entropy, token_entropy
from omniad.methods.pmad.tokenizer import Codebook, VisualTokenizer
from omniad.postprocess import gaussian_blur, image_score, upsample
from omniad.registry import register_detector
from omniad.types import AnomalyScores

# Settings a preset fills in for every such parameter left at None. "paper": ViT-B/16 encoder and decoder, the
# dVAE's 8192-token vocabulary, 300 epochs with 10 of warm-up, lr 1.5e-3 (PMAD's released training script).
# "cpu": a small ViT that trains in minutes on a 2-core CPU (measured: see benchmarks/results/cross_class.md).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(num_tokens=8192, embed_dim=768, depth=12, num_heads=12, epochs=300, warmup_epochs=10,
                  lr=1.5e-3, num_prototypes=1024),
    "cpu": dict(num_tokens=64, embed_dim=64, depth=1, num_heads=4, epochs=10, warmup_epochs=1,
                lr=3e-3, num_prototypes=256),
}
INPUT_EMBEDDINGS = ("features", "pixels")
SCORINGS = ("entropy", "cross_entropy")
PROTOTYPE_METHODS = ("coreset", "kmeans")


@register_detector("pmad")
class PMAD(BaseDetector):
    """PMAD: masked visual-token prediction with prototype-guided proposal masking (cross-class, one-for-all).

    Args:
        preset: "paper" or "cpu"; fills every parameter below that is left at None (explicit values win).
        input_embedding: what the ViT embeds per patch: "features" (the frozen backbone's patch features) or
            "pixels" (raw p x p RGB patches, as the paper's ViT does).
        patch_size: side p of a ViT patch in pixels (paper: 16); the image size must be a multiple of it.
        stages: backbone feature indices whose maps, pooled to the patch grid, are the patch features behind the
            tokens, the prototypes and (``input_embedding="features"``) the ViT input.
        num_tokens: visual-token vocabulary size K (paper: the dVAE's 8192).
        embed_dim: ViT width of the encoder and (symmetric) decoder (paper: 768).
        depth: encoder blocks; the decoder gets as many unless ``decoder_depth`` says otherwise (paper: 12).
        num_heads: attention heads (paper: 12).
        decoder_depth: decoder blocks; None = ``depth`` (the symmetric structure PMAD recommends).
        mlp_ratio: MLP width of each transformer block relative to its width.
        train_mask_ratio: share of patches hidden in each training image (paper: 0.3).
        train_masking: "combined" (random or block-wise, 50/50 per image, paper), "random" or "blockwise".
        epochs: training epochs over the cached features (paper: 300).
        warmup_epochs: linear learning-rate warm-up before the cosine decay (paper: 10).
        lr: AdamW learning rate (paper: 1.5e-3).
        weight_decay: AdamW weight decay.
        clip_grad: gradient-norm clipping (paper: 3.0; 0 disables).
        num_prototypes: number of nominal prototypes learned on the normal patch features.
        prototype_method: "coreset" (greedy k-center sub-sampling, as the paper's prototypes) or "kmeans".
        prototype_pool: local average window applied to patch features before prototype distances.
        mask_ratio: m, the share of patches hidden per inference round (paper's code: 0.3).
        inference_masking: "proposal" (prototype-guided, paper), or "random" / "blockwise" for the ablation.
        scoring: patch score: "cross_entropy" of the observed token under the predicted distribution (what PMAD's
            released test code computes; the default, since the entropy was at or below chance in every CPU run
            measured here) or "entropy" -sum p log p of the predicted distribution (the paper's formula).
        prototype_weighting: multiply the patch score by the patch's prototype distance (PMAD's released test
            code multiplies its token score by its prototype abnormality map; the paper's text does not).
            Defaults follow the released code; ``scoring="entropy", prototype_weighting=False`` is the text's.
        sigma: Gaussian smoothing of the up-sampled map (protocol: 4).
        image_pooling: image score from the map: "top1" (protocol top-1% mean), "max" or "maxpool".
        kmeans_samples: tokenizer and prototypes are fitted on at most this many random training patches.
        **common: see ``BaseDetector``; ``batch_size`` is also the training batch size.
    """

    # settings small enough for the contract test on the tiny synthetic set (seconds on a 2-core CPU)
    test_params: dict[str, Any] = dict(preset="cpu", patch_size=8, num_tokens=32, embed_dim=32, num_heads=2, epochs=4,
                       num_prototypes=64)

    def __init__(
        self,
        *,
        preset: str = "paper",
        input_embedding: str = "features",
        patch_size: int = 16,
        stages: tuple[int, ...] = (2, 3),
        num_tokens: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        decoder_depth: int | None = None,
        mlp_ratio: float = 4.0,
        train_mask_ratio: float = 0.3,
        train_masking: str = "combined",
        epochs: int | None = None,
        warmup_epochs: int | None = None,
        lr: float | None = None,
        weight_decay: float = 0.05,
        clip_grad: float = 3.0,
        num_prototypes: int | None = None,
        prototype_method: str = "coreset",
        prototype_pool: int = 3,
        mask_ratio: float = 0.3,
        inference_masking: str = "proposal",
        scoring: str = "cross_entropy",
        prototype_weighting: bool = True,
        sigma: float = 4.0,
        image_pooling: str = "top1",
        kmeans_samples: int = 100_000,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        for name, allowed, value in (
            ("input_embedding", INPUT_EMBEDDINGS, input_embedding),
            ("train_masking", TRAIN_MASKINGS, train_masking),
            ("inference_masking", INFERENCE_MASKINGS, inference_masking),
            ("scoring", SCORINGS, scoring),
            ("prototype_method", PROTOTYPE_METHODS, prototype_method),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; use one of {allowed}")
        for name, value in (("mask_ratio", mask_ratio), ("train_mask_ratio", train_mask_ratio)):
            if not 0 < value < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {value}")
        if self.image_size % patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {patch_size}")
        chosen = dict(num_tokens=num_tokens, embed_dim=embed_dim, depth=depth, num_heads=num_heads, epochs=epochs,
                      warmup_epochs=warmup_epochs, lr=lr, num_prototypes=num_prototypes)
        resolved = resolve_preset(PRESETS, preset, chosen)
        self.preset = preset
        self.input_embedding = input_embedding
        self.patch_size = patch_size
        self.stages = tuple(stages)
        self.num_tokens = int(resolved["num_tokens"])
        self.embed_dim = int(resolved["embed_dim"])
        self.depth = int(resolved["depth"])
        self.num_heads = int(resolved["num_heads"])
        self.decoder_depth = decoder_depth
        self.mlp_ratio = mlp_ratio
        self.train_mask_ratio = train_mask_ratio
        self.train_masking = train_masking
        self.epochs = int(resolved["epochs"])
        self.warmup_epochs = int(resolved["warmup_epochs"])
        self.lr = float(resolved["lr"])
        self.weight_decay = weight_decay
        self.clip_grad = clip_grad
        self.num_prototypes = int(resolved["num_prototypes"])
        self.prototype_method = prototype_method
        self.prototype_pool = prototype_pool
        self.mask_ratio = mask_ratio
        self.inference_masking = inference_masking
        self.scoring = scoring
        self.prototype_weighting = prototype_weighting
        self.sigma = sigma
        self.image_pooling = image_pooling
        self.kmeans_samples = kmeans_samples

    # ----------------------------------------------------------------- shapes and features
    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    def _make_backbone(self) -> Backbone:
        return Backbone(self.backbone, self.stages, "random" if self._loading else self.weights)

    def _grid_features(self, feats: list[Tensor]) -> Tensor:
        """Backbone stage maps -> (B, C, h, w) features on the patch grid (finer stages area-pooled)."""
        return fuse_stages(feats, size=self.grid, mode="area")

    def _pooled(self, grid_feats: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, h * w, C) locally averaged features, the space prototypes live in."""
        k = self.prototype_pool
        if k > 1:
            grid_feats = F.avg_pool2d(grid_feats, k, stride=1, padding=k // 2, count_include_pad=False)
        return grid_feats.flatten(2).transpose(1, 2)

    def _inputs(self, images: Tensor | None, patch_feats: Tensor) -> Tensor:
        """Per-patch ViT input (B, N, in_dim): standardised features or normalised raw pixel patches."""
        if self.input_embedding == "features":
            return self.tokenizer_.standardise(patch_feats)
        x = self.backbone_.normalize(images)
        return F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)

    def _in_dim(self, feature_dim: int) -> int:
        return feature_dim if self.input_embedding == "features" else 3 * self.patch_size**2

    def _check_grid(self, images: Tensor) -> None:
        h, w = images.shape[-2:]
        if (h // self.patch_size, w // self.patch_size) != self.net_.grid or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"PMAD was fitted on {self.image_size}x{self.image_size} images ({self.net_.grid} patches of "
                f"{self.patch_size} px); got images of {h}x{w}"
            )

    # ----------------------------------------------------------------- fitting
    def _fit(self, images) -> None:
        self.backbone_ = self._make_backbone().to(self.device_)
        keep_pixels = self.input_embedding == "pixels"

        def transform(feats: list[Tensor]) -> list[Tensor]:
            return [self._grid_features(feats)]

        (grid_feats,) = extract_features(self.backbone_, images, self.device_, self.batch_size, transform,
                                         progress=self.progress)
        pixels = _uint8_images(images, self.batch_size) if keep_pixels else None
        n_img, dim = grid_feats.shape[:2]
        patch_feats = grid_feats.flatten(2).transpose(1, 2).contiguous()  # (N_img, N, C)

        self.tokenizer_ = VisualTokenizer(self.num_tokens, dim).to(self.device_)
        self.tokenizer_.fit(patch_feats.reshape(-1, dim).to(self.device_), seed=self.seed,
                            max_samples=self.kmeans_samples)
        tokens = self.tokenizer_.encode(patch_feats.to(self.device_)).cpu()
        self.prototypes_ = self._fit_prototypes(grid_feats)

        self.net_ = PMADNet(self._in_dim(dim), self.tokenizer_.num_tokens, self.grid, self.embed_dim, self.depth,
                            self.num_heads, decoder_depth=self.decoder_depth, mlp_ratio=self.mlp_ratio)
        self.net_.to(self.device_)
        self._train(patch_feats, pixels, tokens)
        self.net_.eval()

    def _fit_prototypes(self, grid_feats: Tensor) -> Codebook:
        pooled = self._pooled(grid_feats).reshape(-1, grid_feats.shape[1])
        codebook = Codebook(self.num_prototypes, pooled.shape[1]).to(self.device_)
        standardised = codebook.fit_standardisation(pooled.to(self.device_))
        generator = torch.Generator().manual_seed(self.seed)
        if standardised.shape[0] > self.kmeans_samples:
            pick = torch.randperm(standardised.shape[0], generator=generator)[: self.kmeans_samples]
            standardised = standardised[pick.to(standardised.device)]
        if self.prototype_method == "coreset":
            index = greedy_coreset(standardised, self.num_prototypes, seed=self.seed)
            codebook.set_codes(standardised[index.to(standardised.device)])
        else:
            codebook.set_codes(kmeans(standardised, self.num_prototypes, seed=self.seed))
        return codebook

    @torch.no_grad()
    def adapt_prototypes(self, normal_images: Any) -> PMAD:
        """Re-learn the nominal prototypes on normal images of the classes to be inspected (the paper builds
        prototypes "for both seen and unseen classes"); the tokenizer and the network stay as trained. Optional:
        without it, prototypes come from the training classes only (pure cross-class)."""
        self._check_fitted()
        (grid_feats,) = extract_features(self.backbone_, normal_images, self.device_, self.batch_size,
                                         lambda feats: [self._grid_features(feats)], progress=self.progress)
        self.prototypes_ = self._fit_prototypes(grid_feats)
        return self

    def _train(self, patch_feats: Tensor, pixels: Tensor | None, tokens: Tensor) -> None:
        n_img = patch_feats.shape[0]
        batch = max(1, min(self.batch_size, n_img))
        steps_per_epoch = math.ceil(n_img / batch)
        total = max(1, self.epochs * steps_per_epoch)
        warmup = min(self.warmup_epochs * steps_per_epoch, total - 1)
        optimizer = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        generator = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        epochs = range(self.epochs)
        if self.progress:
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, desc="PMAD training", unit="epoch", leave=False)
        self.net_.train()
        self.loss_history_: list[float] = []
        for _ in epochs:
            order = torch.randperm(n_img, generator=generator)
            epoch_loss = 0.0
            for start in range(0, n_img, batch):
                idx = order[start : start + batch]
                images = None if pixels is None else pixels[idx].to(self.device_).float().div_(255)
                x = self._inputs(images, patch_feats[idx].to(self.device_))
                mask = training_mask(len(idx), self.grid, self.train_mask_ratio, self.train_masking, rng)
                mask = mask.to(self.device_)
                logits = self.net_(x, mask)
                loss = F.cross_entropy(logits[mask], tokens[idx].to(self.device_)[mask])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.clip_grad > 0:
                    nn.utils.clip_grad_norm_(self.net_.parameters(), self.clip_grad)
                optimizer.step()
                scheduler.step()
                epoch_loss += loss.item() * len(idx)
            self.loss_history_.append(epoch_loss / n_img)
            if self.progress:
                epochs.set_postfix(loss=f"{self.loss_history_[-1]:.3f}")

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def patch_score_variants(self, images: Tensor) -> dict[str, Tensor]:
        """Every patch score PMAD can use, from one pass of the masking rounds.

        Args:
            images: (B, 3, H, W) images on ``device_``.

        Returns:
            (B, N) tensors: "entropy" and "cross_entropy" of the token prediction made while the patch was
            hidden, and "prototype", the distance of the patch to its nearest nominal prototype.
        """
        self._check_grid(images)
        grid_feats = self._grid_features(self.backbone_(images))
        patch_feats = grid_feats.flatten(2).transpose(1, 2)
        distances = self.prototypes_.nearest(self._pooled(grid_feats))[0]
        x = self._inputs(images, patch_feats)
        tokens = self.tokenizer_.encode(patch_feats)
        rng = np.random.default_rng(self.seed)  # same masks for the same images, call after call
        rounds = inference_rounds(self.inference_masking, distances, self.net_.grid, self.mask_ratio, rng)
        entropy = torch.zeros_like(distances)
        cross_entropy = torch.zeros_like(distances)
        count = torch.zeros_like(distances)
        for mask in rounds:
            logits = self.net_(x, mask)
            entropy += token_entropy(logits) * mask
            cross_entropy += token_cross_entropy(logits, tokens) * mask
            count += mask
        count = count.clamp_min(1)
        return {"entropy": entropy / count, "cross_entropy": cross_entropy / count, "prototype": distances}

    def patch_scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) images on the device -> (B, N) patch scores (per ``scoring`` and
        ``prototype_weighting``) and (B, N) prototype distances."""
        variants = self.patch_score_variants(images)
        scores = variants[self.scoring]
        if self.prototype_weighting:
            scores = scores * variants["prototype"]
        return scores, variants["prototype"]

    def _to_scores(self, patch: Tensor, size: tuple[int, int]) -> AnomalyScores:
        maps = gaussian_blur(upsample(patch.view(-1, *self.net_.grid), size), self.sigma)
        return AnomalyScores(image_score(maps, self.image_pooling), maps)

    def _score(self, images: Tensor) -> AnomalyScores:
        return self._to_scores(self.patch_scores(images)[0], tuple(images.shape[-2:]))

    @torch.no_grad()
    def score_variants(self, images: Tensor) -> dict[str, AnomalyScores]:
        """Scores of every scoring choice from one pass (for ablations): "entropy", "cross_entropy", each also
        "...*prototype" (weighted by the prototype distance), and "prototype" (the distance alone, i.e. the
        proposal ranking used as a detector). Returned on the CPU."""
        self._check_fitted()
        variants = self.patch_score_variants(images.to(self.device_))
        for name in ("entropy", "cross_entropy"):
            variants[f"{name}*prototype"] = variants[name] * variants["prototype"]
        size = tuple(images.shape[-2:])
        return {k: AnomalyScores(*(t.float().cpu() for t in self._to_scores(v, size))) for k, v in variants.items()}

    # ----------------------------------------------------------------- persistence
    def _modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone_, "tokenizer": self.tokenizer_, "prototypes": self.prototypes_,
                "net": self.net_}

    def _meta(self) -> dict[str, Any]:
        return {"feature_dim": self.tokenizer_.dim, "num_tokens": self.tokenizer_.num_tokens,
                "num_prototypes": self.prototypes_.size, "grid": list(self.net_.grid)}

    def _build(self, meta: dict[str, Any]) -> None:
        dim = int(meta["feature_dim"])
        self.backbone_ = self._make_backbone()
        self.tokenizer_ = VisualTokenizer(int(meta["num_tokens"]), dim)
        self.prototypes_ = Codebook(int(meta["num_prototypes"]), dim)
        self.net_ = PMADNet(self._in_dim(dim), int(meta["num_tokens"]), tuple(meta["grid"]), self.embed_dim,
                            self.depth, self.num_heads, decoder_depth=self.decoder_depth, mlp_ratio=self.mlp_ratio)


def _uint8_images(images, batch_size: int) -> Tensor:
    """The training images as a uint8 (N, 3, H, W) cache (a quarter of float32's memory) for pixel inputs."""
    from omniad.data.sources import iterate_batches

    return torch.cat([(b.clamp(0, 1) * 255).round().to(torch.uint8) for b in iterate_batches(images, batch_size)])
