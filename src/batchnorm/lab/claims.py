"""The claims the lab tests, in the project's own words (ids as in CLAIMS.md)."""

from __future__ import annotations

CLAIMS: dict[str, str] = {
    "C1": "A network with batch norm gets to a given test accuracy in fewer training steps.",
    "C2": "Batch norm lets training run at larger learning rates before it blows up.",
    "C3": "Batch norm keeps the distribution of each layer's inputs steadier while the earlier "
    "layers learn (less internal covariate shift).",
    "C5": "Batch norm regularizes: the gap between training and test accuracy shrinks, and it "
    "can take the place of dropout.",
    "C6": "With batch norm the outcome depends much less on how large the initial weights are.",
    "C9": "Batch norm gets worse when batches are small, because the statistics of a few examples "
    "are noisy.",
    "C15": "One of the sources says batch norm copes with any batch size, which contradicts C9; "
    "here it is tested directly.",
}
