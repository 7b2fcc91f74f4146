"""Matryoshka contrastive loss: open_clip's CLIP loss summed over nested prefixes of the embedding."""
from typing import Optional, Sequence

import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features

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

    def forward(self, image_features, text_features, logit_scale):
        """Unnormalised (or normalised: each prefix is re-normalised anyway) full-width features.
        Returns (total, {dim: loss}) with the per-dim losses detached."""
        width = image_features.shape[-1]
        if self.dims[-1] > width:
            raise ValueError(f"dims {self.dims} go above the feature width {width}")
        if self.world_size > 1:
            all_image, all_text = gather_features(
                image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                rank=self.rank, world_size=self.world_size)
        else:
            all_image, all_text = image_features, text_features
        labels = self.get_ground_truth(image_features.device, image_features.shape[0] if self.local_loss or
                                       self.world_size == 1 else all_image.shape[0])

        total = 0.0
        per_dim = {}
        for m, weight in zip(self.dims, self.weights):
            img_all, txt_all = F.normalize(all_image[:, :m], dim=-1), F.normalize(all_text[:, :m], dim=-1)
            if self.world_size > 1 and self.local_loss:
                img, txt = F.normalize(image_features[:, :m], dim=-1), F.normalize(text_features[:, :m], dim=-1)
                logits_per_image = logit_scale * img @ txt_all.T
                logits_per_text = logit_scale * txt @ img_all.T
            else:
                logits_per_image = logit_scale * img_all @ txt_all.T
                logits_per_text = logits_per_image.T
            loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
            per_dim[m] = loss.detach()
            total = total + weight * loss
        return total, per_dim
