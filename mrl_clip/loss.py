"""Matryoshka contrastive losses: open_clip's CLIP loss, or its SigLIP loss, summed over nested prefixes of the
embedding.

Both follow open_clip's loss contract: called as `loss(**model_out, output_dict=True)` they return
{"loss_dim{m}": weighted term}, which open_clip_train's train_one_epoch sums into its total and logs term by term;
without output_dict, (total, {m: loss at m, detached}), what mrl_clip.train's loop logs.
"""
import functools
import math
import random
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import (
    ClipLoss,
    SigLipLoss,
    gather_features,
    neighbour_exchange_bidir_with_grad,
    neighbour_exchange_with_grad,
)

from .dims import check_dims, check_weights


class MatryoshkaClipLoss(ClipLoss):
    """Weighted sum over m in `dims` of the symmetric InfoNCE loss on the prefixes z[:, :m], each L2-normalised
    on its own. Features are gathered across ranks once, then sliced per dim (calling a distributed CLIP loss once
    per dim would repeat the all-gather). A standard CLIP is `dims=[embed_dim]`.
    """

    def __init__(
            self,
            dims: Sequence[int],
            weights: Optional[Sequence[float]] = None,
            local_loss: bool = False,
            gather_with_grad: bool = False,
            rank: int = 0,
            world_size: int = 1,
    ):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
        self.dims = check_dims(dims)
        self.weights = check_weights(weights, self.dims)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        """Unnormalised (or normalised: each prefix is re-normalised anyway) full-width features.
        Returns (total, {dim: loss}) with the per-dim losses detached, or with `output_dict` {"loss_dim{m}": weight x
        loss at m} (their sum is the total). `logit_bias` (a model with one) is added to the logits as open_clip's
        ClipLoss does: softmax ignores it."""
        check_width(self.dims, image_features)
        if self.world_size > 1:
            all_image, all_text = gather_features(
                image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                rank=self.rank, world_size=self.world_size)
        else:
            all_image, all_text = image_features, text_features
        labels = self.get_ground_truth(image_features.device, image_features.shape[0] if self.local_loss or
                                       self.world_size == 1 else all_image.shape[0])

        total = 0.0
        per_dim, terms = {}, {}
        for m, weight in zip(self.dims, self.weights):
            img_all, txt_all = F.normalize(all_image[:, :m], dim=-1), F.normalize(all_text[:, :m], dim=-1)
            if self.world_size > 1 and self.local_loss:
                img, txt = F.normalize(image_features[:, :m], dim=-1), F.normalize(text_features[:, :m], dim=-1)
                logits_per_image = logit_scale * img @ txt_all.T
                logits_per_text = logit_scale * txt @ img_all.T
            else:
                logits_per_image = logit_scale * img_all @ txt_all.T
                logits_per_text = logits_per_image.T
            if logit_bias is not None:
                logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
            loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
            per_dim[m], terms[f"loss_dim{m}"] = loss.detach(), weight * loss
            total = total + terms[f"loss_dim{m}"]
        return terms if output_dict else (total, per_dim)


class MatryoshkaSigLipLoss(SigLipLoss):
    """Weighted sum over m in `dims` of open_clip's sigmoid (SigLIP) loss on the prefixes z[:, :m], each
    L2-normalised on its own. open_clip's SigLipLoss exchanges text features with the neighbouring ranks on every
    call; here they are exchanged once, at full width and with gradients as open_clip does (`dist_impl`: its
    'bidir', 'shift', 'reduce' or 'gather'), then sliced per dim.
    """

    def __init__(
            self,
            dims: Sequence[int],
            weights: Optional[Sequence[float]] = None,
            rank: int = 0,
            world_size: int = 1,
            dist_impl: Optional[str] = None,
    ):
        super().__init__(rank=rank, world_size=world_size, dist_impl=dist_impl)
        self.dims = check_dims(dims)
        self.weights = check_weights(weights, self.dims)

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        """Full-width features (normalised or not). Returns (total, {dim: loss}), the per-dim losses detached, or
        with `output_dict` {"loss_dim{m}": weight x loss at m} (their sum is the total; the first term carries the
        exchange's tie)."""
        check_width(self.dims, image_features)
        others, tie = self.exchange(text_features)
        total = tie
        per_dim, terms = {}, {}
        for m, weight in zip(self.dims, self.weights):
            img, txt = F.normalize(image_features[:, :m], dim=-1), F.normalize(text_features[:, :m], dim=-1)
            loss = self._loss(img, txt, logit_scale, logit_bias)
            for other in others:
                loss = loss + self._loss(img, F.normalize(other[:, :m], dim=-1), logit_scale, logit_bias,
                                         negative_only=True)
            per_dim[m], terms[f"loss_dim{m}"] = loss.detach(), weight * loss
            total = total + terms[f"loss_dim{m}"]
        first = f"loss_dim{self.dims[0]}"
        terms[first] = tie + terms[first]
        return terms if output_dict else (total, per_dim)

    def exchange(self, text_features) -> tuple:
        """(the other ranks' text features, received as open_clip's SigLipLoss.forward receives them for its
        `dist_impl`, gradients flowing back to the rank that sent them; a zero to add to the loss). The zero ties
        'reduce's all-reduce of this rank's own features into the graph, as open_clip's `float(i != rank) *`
        does: every rank must run every all-reduce's backward, or the collectives pair up wrongly."""
        tie = 0.0
        if self.world_size == 1:
            return [], tie
        right, left = (self.rank + 1) % self.world_size, (self.rank - 1 + self.world_size) % self.world_size
        received = []
        if self.dist_impl == "bidir":
            to_left = to_right = text_features
            num_bidir, remainder = divmod(self.world_size - 1, 2)
            for _ in range(num_bidir):
                to_left, to_right = neighbour_exchange_bidir_with_grad(left, right, to_left, to_right)
                received += [to_left, to_right]
            if remainder:
                received.append(neighbour_exchange_with_grad(left, right, to_right))
        elif self.dist_impl == "shift":
            to_right = text_features
            for _ in range(self.world_size - 1):
                to_right = neighbour_exchange_with_grad(left, right, to_right)
                received.append(to_right)
        elif self.dist_impl == "reduce":
            for i in range(self.world_size):  # a collective: every rank takes part for every i
                from_i = torch.distributed.nn.all_reduce(text_features * (self.rank == i),
                                                         torch.distributed.ReduceOp.SUM)
                if i != self.rank:
                    received.append(from_i)
                else:
                    tie = 0.0 * from_i.sum()
        else:  # "gather"
            all_text = torch.distributed.nn.all_gather(text_features)
            received = [all_text[i] for i in range(self.world_size) if i != self.rank]
        return received, tie


def check_width(dims: list, features) -> None:
    width = features.shape[-1]
    if dims[-1] > width:
        raise ValueError(f"dims {dims} go above the feature width {width}")


LAYER_WEIGHTINGS = ("uniform", "log", "linear")


def layer_weight(depth: int, weighting: str) -> float:
    """sentence-transformers' AdaptiveLayerLoss weights of an earlier layer (its index = layers run): "uniform"
    (2DMSE, Starbucks), "log" 1 / (1 + ln(1 + i)) (ESE), "linear" 1 / (1 + i)."""
    if weighting == "log":
        return 1.0 / (1.0 + math.log(1 + depth))
    if weighting == "linear":
        return 1.0 / (1 + depth)
    return 1.0


class Matryoshka2dLoss(torch.nn.Module):
    """2D Matryoshka over a two-tower model: a Matryoshka loss (MatryoshkaClipLoss or MatryoshkaSigLipLoss, over
    all its dims) at the full depth and at earlier exits of the layered tower(s), as 2DMSE and sentence-
    transformers' Matryoshka2dLoss (AdaptiveLayerLoss over MatryoshkaLoss) do for one text tower:

        last_layer_weight * L(full) + sum over the sampled earlier exits k of
            prior_layers_weight * w(k) / n_sampled * L(exit k)
            + kl_div_weight * T * KL(softmax(e_k / T) || softmax(e_full / T).detach())

    The features come as [exits, B, D] stacks (normalised at full width, as the model's forward gives them); a
    tower that is not layered has one exit, its full depth, which every exit is paired with; when both towers are
    layered, exit k of one is paired with exit k of the other (the model truncated at both). The KL term is
    sentence-transformers': a softmax over each full-width embedding's coordinates, "batchmean", the full depth the
    detached teacher; averaged over the layered towers (for a text-text batch through one tower that is its mean
    over anchors and positives, sentence-transformers' concatenation). `layers_per_step` earlier exits are drawn
    per step (-1 or more than there are: all), seeded by (seed, step) so every rank, pass and resume draws the same.
    """

    def __init__(self, loss, depths: dict, layers_per_step: int = 1, last_layer_weight: float = 1.0,
                 prior_layers_weight: float = 1.0, kl_div_weight: float = 1.0, kl_temperature: float = 0.3,
                 layer_weighting: str = "uniform", seed: int = 0):
        """`depths`: {"image": [...], "text": [...]} the exits of each layered tower (increasing, the last its
        full depth; equally many when both are layered)."""
        super().__init__()
        self.loss, self.depths = loss, {t: list(d) for t, d in depths.items() if d}
        counts = {len(d) for d in self.depths.values()}
        if len(counts) != 1:
            raise ValueError(f"the layered towers list different numbers of exits: {self.depths}")
        self.exits = counts.pop()
        if layer_weighting not in LAYER_WEIGHTINGS:
            raise ValueError(f"layer_weighting must be one of {LAYER_WEIGHTINGS}, got {layer_weighting!r}")
        self.layers_per_step, self.layer_weighting, self.seed = layers_per_step, layer_weighting, seed
        self.last_layer_weight, self.prior_layers_weight = last_layer_weight, prior_layers_weight
        self.kl_div_weight, self.kl_temperature = kl_div_weight, kl_temperature

    def label(self, k: int) -> str:
        return "-".join(f"{t}{d[k]}" for t, d in self.depths.items())

    def sample(self, step: int) -> list[int]:
        """The earlier exits (indices) step `step` trains."""
        prior = list(range(self.exits - 1))
        if 0 < self.layers_per_step < len(prior):
            prior = sorted(random.Random(self.seed * 1_000_003 + step).sample(prior, self.layers_per_step))
        return prior

    def at_step(self, step: int):
        return functools.partial(self.forward, prior=self.sample(step))

    def forward(self, image_exits, text_exits, *scalars, prior=None):
        """(total, {dim m: full-depth loss at m, "{label}_dim{m}": an earlier exit's, "{label}_kl": its KL term},
        detached). `prior`: the earlier exits to train (default: all)."""
        prior = list(range(self.exits - 1)) if prior is None else prior
        exit_of = lambda x, k: x[k] if len(x) > 1 else x[-1]  # noqa: E731
        total, per_dim = self.loss(image_exits[-1], text_exits[-1], *scalars)
        total = self.last_layer_weight * total
        if self.kl_temperature > 0:
            teachers = [F.softmax(x[-1] / self.kl_temperature, dim=-1).detach()
                        for x in (image_exits, text_exits) if len(x) > 1]
        for k in prior:
            weight = layer_weight(max(d[k] for d in self.depths.values()), self.layer_weighting)
            term, exit_dims = self.loss(exit_of(image_exits, k), exit_of(text_exits, k), *scalars)
            total = total + term * weight / len(prior) * self.prior_layers_weight
            per_dim.update({f"{self.label(k)}_dim{m}": v for m, v in exit_dims.items()})
            if self.kl_temperature > 0:
                students = [x[k] for x in (image_exits, text_exits) if len(x) > 1]
                kl = sum(F.kl_div(F.log_softmax(s / self.kl_temperature, dim=-1), t, reduction="batchmean")
                         for s, t in zip(students, teachers)) / len(students)
                total = total + kl * self.kl_temperature * self.kl_div_weight
                per_dim[f"{self.label(k)}_kl"] = kl.detach()
        return total, per_dim


class MatryoshkaDistillLoss(ClipLoss):
    """open_clip's DistillClipLoss at every prefix: for m in `dims`, the CLIP loss of the student's re-normalised
    prefixes z[:, :m] (the student's logit_scale) plus the cross-entropy of their logits against the softmax of a
    frozen teacher's full-width logits (the teacher's logit_scale), weighted by `weights` and summed. At one dim,
    the embedding width, it is DistillClipLoss. Both models' features are gathered across ranks as open_clip's
    get_logits gathers them (the teacher's once, without gradients: it has none).
    """

    def __init__(self, dims: Sequence[int], weights: Optional[Sequence[float]] = None, local_loss: bool = False,
                 gather_with_grad: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)
        self.dims = check_dims(dims)
        self.weights = check_weights(weights, self.dims)

    def dist_loss(self, teacher_logits, student_logits):  # open_clip's DistillClipLoss.dist_loss
        return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    def prefix_logits(self, image, text, m: int, logit_scale) -> tuple:
        """open_clip's get_logits on the re-normalised m-prefixes."""
        return self.get_logits(F.normalize(image[:, :m], dim=-1), F.normalize(text[:, :m], dim=-1), logit_scale)

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict=False):
        """Returns (total, {dim m: contrastive + distillation loss at m, detached}), or with `output_dict`
        {"contrastive_loss_dim{m}", "distill_loss_dim{m}": weighted terms} (their sum is the total)."""
        check_width(self.dims, image_features)
        teacher = self.prefix_logits(dist_image_features, dist_text_features, dist_text_features.shape[-1],
                                     dist_logit_scale)
        total = 0.0
        per_dim, terms = {}, {}
        for m, weight in zip(self.dims, self.weights):
            logits_per_image, logits_per_text = self.prefix_logits(image_features, text_features, m, logit_scale)
            labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
            contrastive = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
            distill = (self.dist_loss(teacher[0], logits_per_image) + self.dist_loss(teacher[1], logits_per_text)) / 2
            terms[f"contrastive_loss_dim{m}"], terms[f"distill_loss_dim{m}"] = weight * contrastive, weight * distill
            per_dim[m] = (contrastive + distill).detach()
            total = total + weight * (contrastive + distill)
        return terms if output_dict else (total, per_dim)
