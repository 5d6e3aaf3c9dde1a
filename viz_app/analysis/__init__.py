"""Every analysis defined in docs/DEFINITIONS.md as pure, batch-aware torch functions (no Streamlit).

Shapes: B batch, L layers, H heads, T tokens, P prefix tokens, N = gh * gw patches.
Attention stacks are (B, L, H, T, T), post-softmax. Inputs are never modified.
"""

from .attention import (
    attention_entropy,
    attention_maps,
    attention_to_patch,
    mass_threshold_mask,
    readout_rows,
)
from .classes import contrastive_map, relevance_share
from .distance import distance_statistics, mean_attention_distance, patch_distances, prefix_mass_share
from .faithfulness import curve_auc, mean_ci, removal_counts, removal_order, spearman, ssim
from .filters import filter_pca
from .lrp import transformer_attribution
from .masks import DEFAULT_TAU, mask_iou, mask_ious, patch_mask_pixels
from .posembed import (
    compare_position_embeddings,
    neighbour_contrast,
    position_similarity,
    similarity_by_offset,
    similarity_decay,
    similarity_tiles,
)
from .rollout import attention_rollout, fuse_heads, gradient_rollout, rollout_per_layer
from .tokens import budget_names, token_budgets, token_norm_outliers

__all__ = [
    "DEFAULT_TAU",
    "attention_entropy",
    "attention_maps",
    "attention_rollout",
    "attention_to_patch",
    "budget_names",
    "compare_position_embeddings",
    "contrastive_map",
    "curve_auc",
    "distance_statistics",
    "filter_pca",
    "fuse_heads",
    "gradient_rollout",
    "mask_iou",
    "mask_ious",
    "mass_threshold_mask",
    "mean_attention_distance",
    "mean_ci",
    "neighbour_contrast",
    "patch_distances",
    "patch_mask_pixels",
    "position_similarity",
    "prefix_mass_share",
    "readout_rows",
    "relevance_share",
    "removal_counts",
    "removal_order",
    "rollout_per_layer",
    "similarity_by_offset",
    "similarity_decay",
    "similarity_tiles",
    "spearman",
    "ssim",
    "token_budgets",
    "token_norm_outliers",
    "transformer_attribution",
]
