"""PatchCore (Roth et al., CVPR 2022): a memory bank of locally aggregated mid-level patch features, reduced by a
greedy k-center coreset; a patch is as anomalous as its distance to the nearest bank entry.

Trained unified: one bank for the patches of every product type, no labels.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniad.backbone import Backbone
from omniad.cluster import NearestSearch, faiss_available
from omniad.coreset import ShardedGreedy, StreamingCoreset, greedy_coreset
from omniad.distributed import gather_rows, is_main, sum_over_ranks, world
from omniad.features import fuse_stages
from omniad.memory import allocate
from omniad.methods.base import BaseDetector, RawScores
from omniad.params import POSITIVE_INT, Each, Interval, Options
from omniad.postprocess import POOLINGS
from omniad.registry import register_detector
from omniad.runtime import is_exporting

DISTANCE_CHUNK = 4096  # patches compared with the whole memory bank at once (memory: chunk x bank size floats)
NPROBE = 16  # cells an "ivf" search compares a patch in (benchmarks/results/bank-search.md measures 1-32)
SUPPORT_CHUNK = 2**24  # bank-to-bank distances held at once while finding the support sets (64 MiB of floats)


def aggregate_patches(features: list[Tensor], patch_size: int = 3) -> Tensor:
    """PatchCore's locally aware patch features: ``patch_size`` x ``patch_size`` average of each stage, the coarser
    stages up-sampled to the first stage's grid, concatenated. (B, C, h, w).

    The zero padding counts in the border averages, as in PatchCore's reference code (it unfolds zero-padded
    neighbourhoods) and the peer's: measured on kolektor (one model, 1% coreset, lite0, 256 px), image AUROC 77.2
    -> 82.4 and AU-PRO 29.6 -> 38.4 against averaging the border patches over their real neighbours only."""
    pooled = [F.avg_pool2d(f, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True) for f in features]
    return fuse_stages(pooled)


class PatchCoreNet(nn.Module):
    """Backbone features -> patch distances to the memory bank. Pure: no training logic."""

    def __init__(self, backbone: Backbone, bank_size: int, feature_dim: int, patch_size: int = 3,
                 bank_dtype: torch.dtype = torch.float32, nlist: int | None = None, nprobe: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = patch_size
        self.nlist, self.nprobe = nlist, nprobe  # the bank's search: exact (nlist None) or IVF (NearestSearch)
        self.register_buffer("memory_bank", torch.zeros(bank_size, feature_dim, dtype=bank_dtype))

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C, h, w) aggregated patch features."""
        return aggregate_patches(self.backbone(images), self.patch_size)

    def distances(self, emb: Tensor) -> Tensor:
        """(B, C, h, w) patch features -> (B, h, w) nearest-bank distances."""
        return self.nearest(emb)[0]

    def nearest(self, emb: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, h, w) patch features -> (B, h, w) nearest-bank distances and the bank index of each."""
        b, c, h, w = emb.shape
        queries = emb.permute(0, 2, 3, 1).reshape(-1, c)
        distances, index = self._search()(queries)
        return distances.view(b, h, w), index.view(b, h, w)

    def _search(self) -> NearestSearch:
        """The bank's search structure, rebuilt when the bank changes (fit, load)."""
        key = (self.memory_bank.data_ptr(), self.memory_bank._version, self.memory_bank.device)
        if getattr(self, "_search_key", None) != key:
            self._search_index = NearestSearch(self.memory_bank, DISTANCE_CHUNK, self.nlist, self.nprobe)
            self._search_key = key
        return self._search_index

    def support(self, neighbours: int) -> Tensor:
        """(bank size, k) indices of the k = min(``neighbours``, bank size) bank entries nearest each bank entry, the
        entry itself first: the re-weighting's support sets, which depend on the bank alone. Computed once per bank
        (fit, load, adaptation) rather than per image: an exported graph then gathers rows instead of sorting the
        bank for every image."""
        bank = self.memory_bank
        k = min(neighbours, bank.shape[0])
        key = (bank.data_ptr(), bank._version, bank.device, k)
        if getattr(self, "_support_key", None) != key:
            bank = bank.float()
            rows = max(1, SUPPORT_CHUNK // bank.shape[0])
            with torch.no_grad():
                table = [torch.cdist(bank[i : i + rows], bank).topk(k, largest=False).indices
                         for i in range(0, bank.shape[0], rows)]
            table = torch.cat(table)
            if is_exporting():  # through numpy, so the trace holds the table as a constant, not the search
                table = torch.from_numpy(table.cpu().numpy()).to(bank.device)
            self._support, self._support_key = table, key
        return self._support

    def reweighted_scores(self, emb: Tensor, distances: Tensor, neighbours: int) -> Tensor:
        """PatchCore's image score (paper, Eq. 7): the largest patch distance s* = |m_test* - m*|, scaled by
        1 - softmax over the distances from m_test* to m* and to the ``neighbours`` - 1 bank entries nearest m*:
        a patch whose nearest bank entry sits among other close entries (a dense, well-known region) keeps less
        of its score than one whose bank entry is isolated. (B,) scores.

        m* is searched again for the worst patch alone rather than kept for every patch: an exported graph then
        needs no arg-min over all patches x the bank (OpenVINO's took 18 of the 42 ms of a 4-image batch)."""
        b = emb.shape[0]
        flat_d = distances.flatten(1)
        worst = flat_d.argmax(1)
        rows = torch.arange(b, device=emb.device)
        score = flat_d[rows, worst]
        query = emb.flatten(2).transpose(1, 2)[rows, worst]  # (B, C) the worst patch's feature
        bank = self.memory_bank.to(query.dtype)  # a float16 bank is compared in float32
        nearest = torch.cdist(query, bank).argmin(1)  # m*
        support = self.support(neighbours)[nearest]  # (B, k): m* and its nearest bank entries
        to_support = (query.unsqueeze(1) - bank[support]).norm(dim=-1)  # (B, k)
        return (1 - torch.softmax(to_support, dim=1)[:, 0]) * score

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, h, w) nearest-bank distances."""
        return self.distances(self.embed(images))


def _patches(emb: Tensor) -> Tensor:
    """(B, C, h, w) patch features -> (B x h x w, C) rows, image by image, row by row, float32 on the CPU."""
    return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).float().cpu()


def _feature_batches(features: Any, batch_size: int) -> Any:
    """Batches of (B, C, h, w) features: a ``FeatureStream`` as it streams, a cached tensor in slices."""
    if isinstance(features, Tensor):
        return features.split(batch_size)
    return features


def _image_count(features: Any) -> int:
    return int(features.shape[0]) if isinstance(features, Tensor) else len(features)


@register_detector("patchcore")
class PatchCore(BaseDetector):
    """PatchCore, fitted unified on every product type at once.

    Args:
        stages: backbone feature indices (PatchCore: the two mid-level stages; 2, 3 = strides 8, 16 for
            EfficientNets, layer2/layer3 of a ResNet are 1, 2 ... check ``Backbone.strides``).
        patch_size: neighbourhood of the local average aggregation.
        coreset_ratio: share of all training patches kept in the memory bank, in (0, 1] (paper: 0.01-0.25;
            0.1 here).
        coreset: how the bank is searched (``omniad.coreset``). "chunked" (default): the patches stream in the
            training set's order, cut into chunks of ``coreset_chunk_size``; each chunk is reduced to
            ``coreset_ratio`` of itself by greedy k-center and the chunks' coresets are joined: time linear in
            the images, memory of one chunk plus the bank, and a set within one chunk gets exactly the paper's
            coreset. "greedy": the paper's one search over every patch (time ratio x N^2, every projected patch
            in memory); with several processes it is shared between them and gives the one-process coreset.
        coreset_chunk_size: patches per chunk of the "chunked" search (16 images of 32 x 32 patches: the
            projected chunk, 8 MB, stays in a CPU cache; measured 0.5 ms per centre here, 13 ms at 65,536).
        max_bank_size: optional cap on the bank size (a CPU-friendly setting; None = no cap).
        coreset_candidates: optional cap on the patches the paper's "greedy" search runs over, drawn at random
            first (a CPU-friendly setting: each greedy step is one pass over the candidates; None = all patches).
        projection_dim: dimension of the random projection the greedy coreset search runs on.
        bank_dtype: "float32" (default) or "float16": the memory bank held and saved in half precision (half the
            model file; distances are still computed in float32 from the rounded entries).
        search: how a patch finds its nearest bank entry. "exact" (default; the paper's, and what an exported
            graph does) or "ivf": faiss's inverted-file index (``omniad.cluster.NearestSearch``), which compares
            a patch with the entries of its ``nprobe`` nearest of ``nlist`` k-means cells only, for large banks
            (a long line at the default ratio holds 100,000s of entries). It may miss the nearest entry, which
            only raises a patch's distance; an "ivf" model is not exported (its graph would search exactly).
        nlist: cells of the "ivf" search (None = 4 x the square root of the bank size, faiss's rule of thumb, at
            most one cell per 39 entries).
        nprobe: cells each patch is compared in, for the "ivf" search.
        neighbours: bank entries the "reweighted" image score compares the worst patch with (paper: b = 9).
        **common: see ``BaseDetector``; ``image_pooling`` may also be "reweighted", the paper's image score
            (Eq. 7: the largest patch distance, re-weighted by its bank neighbourhood, before up-sampling and
            smoothing; ``PatchCoreNet.reweighted_scores``). Defaults: sigma 4, image_pooling "reweighted".
    """

    test_params: dict[str, Any] = {}
    memorises_training = True  # its model of normality fits its own training images (CADA: out-of-fold targets)
    cache_features = False  # the bank search takes the patches batch by batch (omniad.coreset)
    # the paper's image score (Eq. 7). Measured on the two real types (benchmarks/results/patchcore-scoring.md):
    # it ranks as the maximum of the smoothed map did (77.2 / 92.9 image AUROC), and "top1" ranks best (84.0 / 95.2)
    defaults = {"sigma": 4.0, "image_pooling": "reweighted"}
    constraints = {
        "stages": Each(Interval(0, None, integer=True)),
        "patch_size": POSITIVE_INT,
        "coreset_ratio": Interval(0.0, 1.0, low_open=True),
        "coreset": Options(("chunked", "greedy")),
        "coreset_chunk_size": Interval(1, None, integer=True),
        "max_bank_size": Interval(1, None, integer=True, allow_none=True),
        "coreset_candidates": Interval(1, None, integer=True, allow_none=True),
        "projection_dim": Interval(0, None, integer=True),
        "bank_dtype": Options(("float32", "float16")),
        "search": Options(("exact", "ivf")),
        "nlist": Interval(1, None, integer=True, allow_none=True),
        "nprobe": POSITIVE_INT,
        "neighbours": POSITIVE_INT,
        "image_pooling": Options((*POOLINGS, "reweighted")),
    }

    def __init__(
        self,
        *,
        stages: tuple[int, ...] = (2, 3),
        patch_size: int = 3,
        coreset_ratio: float = 0.1,
        coreset: str = "chunked",
        coreset_chunk_size: int = 16384,
        max_bank_size: int | None = None,
        coreset_candidates: int | None = None,
        projection_dim: int = 128,
        bank_dtype: str = "float32",
        search: str = "exact",
        nlist: int | None = None,
        nprobe: int = NPROBE,
        neighbours: int = 9,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.stages = stages
        self.patch_size = patch_size
        self.coreset_ratio = coreset_ratio
        self.coreset = coreset
        self.coreset_chunk_size = coreset_chunk_size
        self.max_bank_size = max_bank_size
        self.coreset_candidates = coreset_candidates
        self.projection_dim = projection_dim
        self.bank_dtype = bank_dtype
        self.search = search
        self.nlist = nlist
        self.nprobe = nprobe
        self.neighbours = neighbours

    def derive_params(self, values: dict[str, Any]) -> dict[str, Any]:
        if values["coreset"] == "chunked" and values["coreset_candidates"]:
            raise ValueError("patchcore: coreset_candidates subsamples the patches of the paper's search "
                             "(coreset='greedy'); the chunked search runs over every patch in linear time")
        if values["search"] == "exact" and values["nlist"] is not None:
            raise ValueError("patchcore: nlist sets the cells of the approximate search (search='ivf'); "
                             "the exact search has none")
        if values["search"] == "ivf" and not faiss_available():
            raise ValueError("patchcore: search='ivf' is faiss's index, which is not installed: "
                             "pip install 'omniad[faiss]' (or search='exact')")
        return values

    def features(self, images: Tensor) -> Tensor:
        """(B, C, h, w) locally aggregated patch features."""
        return aggregate_patches(self.backbone_(images), self.resolved_.patch_size)

    def train_features(self, features: Any) -> None:
        """Search the bank over the patches of ``features`` (a stream of batches from ``extract``, or cached
        (N, C, h, w) features); with several processes each rank brings the patches of its own images."""
        r = self.resolved_
        batches = iter(_feature_batches(features, self.batch_size))
        first = next(batches, None)
        if first is None:
            raise ValueError("patchcore: no training features to build the memory bank from")
        per_image = int(first.shape[2] * first.shape[3])
        n_images = int(sum_over_ranks(torch.tensor([_image_count(features)]))[0])
        total = n_images * per_image
        n_select = max(1, int(round(r.coreset_ratio * total)))
        if r.max_bank_size:
            n_select = min(n_select, r.max_bank_size)
        progress = self.progress and is_main()
        if r.coreset == "chunked":
            search = StreamingCoreset(n_select / total, r.coreset_chunk_size, r.projection_dim, self.seed,
                                      total=_image_count(features) * per_image, progress=progress)
            for emb in itertools.chain([first], batches):
                search.add(_patches(emb))
            bank = gather_rows(search.finish())[:n_select]  # several processes: every rank's chunks, in rank order
        else:
            bank = self._paper_coreset(itertools.chain([first], batches), _image_count(features), per_image, total,
                                       n_select, progress)
        self.net_ = self._net(bank.shape[0], bank.shape[1])
        self.net_.memory_bank.copy_(bank.to(self.device_))
        self.net_.eval()

    def _net(self, bank_size: int, feature_dim: int) -> PatchCoreNet:
        r = self.resolved_
        nlist = None
        if r.search == "ivf":
            # faiss's rule of thumb, with the 39 entries per cell its k-means asks for (small banks: few cells)
            nlist = r.nlist or max(1, min(round(4 * math.sqrt(bank_size)), bank_size // 39))
        return PatchCoreNet(self.backbone_, bank_size, feature_dim, r.patch_size, getattr(torch, r.bank_dtype),
                            nlist, r.nprobe).to(self.device_)

    def _paper_coreset(self, batches: Any, n_local_images: int, per_image: int, total: int, n_select: int,
                       progress: bool) -> Tensor:
        """The paper's greedy search over every patch (shared between processes when there are several)."""
        r = self.resolved_
        patches, filled = None, 0
        for emb in batches:
            rows = _patches(emb)
            if patches is None:  # above the memory budget the patches spill to a memory-mapped file
                patches = allocate((n_local_images * per_image, rows.shape[1]))
            patches[filled : filled + rows.shape[0]] = rows
            filled += rows.shape[0]
        patches = patches[:filled]
        rank, size = world()
        candidates = None
        if r.coreset_candidates and r.coreset_candidates < total:
            candidates = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))
            candidates = candidates[: r.coreset_candidates]
        if size == 1:
            if candidates is not None:
                patches = patches[candidates]
            index = greedy_coreset(patches.to(self.device_), min(n_select, patches.shape[0]), r.projection_dim,
                                   self.seed, progress)
            return patches[index.cpu()].clone()
        # rank r holds images r, r + size, ... (``shard``): its patches' places in the one-process order
        images = torch.arange(rank, rank + size * (filled // per_image), size)
        global_index = (images[:, None] * per_image + torch.arange(per_image)).flatten()
        n_total = total
        if candidates is not None:  # the one-process search runs over patches[candidates], in that order
            position = torch.full((total,), -1, dtype=torch.long)
            position[candidates] = torch.arange(candidates.numel())
            global_index = position[global_index]
            keep = global_index >= 0
            patches, global_index, n_total = patches[keep], global_index[keep], candidates.numel()
        search = ShardedGreedy(patches, global_index, n_total, r.projection_dim, self.seed)
        return search.select(min(n_select, n_total), progress)[1]

    def adapt_features(self, features: Any) -> None:
        """Few-shot: every patch of the new normal images joins the memory bank (k images are few; no coreset)."""
        bank = self.net_.memory_bank
        patches = torch.cat([_patches(emb) for emb in _feature_batches(features, self.batch_size)])
        self.net_.memory_bank = torch.cat([bank, patches.to(bank.device, bank.dtype)])

    def score_features(self, features: Tensor) -> Tensor | RawScores:
        if self.resolved_.image_pooling != "reweighted":
            return self.net_.distances(features)
        distances = self.net_.distances(features)
        return RawScores(distances, self.net_.reweighted_scores(features, distances, self.resolved_.neighbours))

    def export_blockers(self) -> list[str]:
        if self.resolved_.search == "ivf":
            return ["its memory bank is searched approximately (search='ivf') and an exported graph searches it "
                    "exactly, so the scores and the threshold would not match: fit with search='exact' to export"]
        return super().export_blockers()

    def export_batch_size(self) -> int:
        # the exported graph compares every patch of a run with the whole bank at once: runs of at most
        # DISTANCE_CHUNK patches hold no more memory than torch's chunks do
        stride = self.backbone_.strides[0]
        patches = max(1, -(-self.input_hw[0] // stride)) * max(1, -(-self.input_hw[1] // stride))
        return max(1, min(int(self.batch_size), DISTANCE_CHUNK // patches))

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net_}

    def meta(self) -> dict[str, Any]:
        return {"bank_size": int(self.net_.memory_bank.shape[0]), "feature_dim": int(self.net_.memory_bank.shape[1])}

    def build(self, meta: dict[str, Any]) -> None:
        self.net_ = self._net(meta["bank_size"], meta["feature_dim"])
