"""The evaluate table's metric columns: what each per-image metric means and which way is better."""

from __future__ import annotations

__all__ = ["METRICS", "is_metric"]

#: Table columns: (name, what a higher value means).
METRICS = {
    "deletion_auc": "lower is better: the target score falls fast as top-attributed pixels are removed",
    "insertion_auc": "higher is better: the target score rises fast as top-attributed pixels are revealed",
    "map_hf_energy": "fraction of the map's spectral energy above the cutoff; lower: smoother, image-like",
    "map_tv": "normalised total variation of the map; lower: smoother",
    "randomization_spearman_top": "rank correlation with the map after randomising the top layer; lower passes",
    "randomization_spearman_mean": "rank correlation with the map, mean over the cascade's steps; lower passes",
    "randomization_ssim_top": "SSIM with the map after randomising the top layer; lower passes the check",
    "randomization_ssim_mean": "SSIM with the map, mean over the cascade's steps; lower passes the check",
    "ascent_gain": "target logit gain of the counterfactual (ascent toward another class, fixed L2 budget)",
    "ascent_gain_per_l2": "target logit gain of the counterfactual per unit L2 norm of its perturbation",
    "ascent_flip_rate": "fraction of counterfactuals whose top-1 class became the ascent target",
    "ascent_hf_energy": "high-frequency energy fraction of the counterfactual's perturbation; lower: smoother",
    "ascent_tv": "normalised total variation of the perturbation; lower: smoother",
}


def is_metric(key: str) -> bool:
    """A per-image metric column (METRICS, or transfer_gain/<model>, transfer_flip/<model>)."""
    return key in METRICS or key.startswith("transfer_")
