"""METHODS.md §8's fixed logits (B = 4, C = 4, float64), shared by the reference-value tests."""

import torch

Z_S = torch.tensor([[2.0, 1.0, 0.1, -1.0], [0.5, 0.3, -0.2, 1.5], [0.0, -0.5, 1.0, 0.2],
                    [1.2, 0.8, -0.3, 0.0]], dtype=torch.float64)
Z_T = torch.tensor([[3.0, 0.5, 0.0, -2.0], [0.0, 1.0, -1.0, 2.5], [-1.0, 0.0, 2.0, 0.5],
                    [2.0, 0.0, -1.0, -0.5]], dtype=torch.float64)
Y = torch.tensor([0, 3, 2, 1])


def shift_loader(digits, seed=0, views=None):
    """Digits in batches of 64 with a ±1-pixel shift (the methods' training tests)."""
    from kdkit.data.augment import build_augment
    from kdkit.data.loader import BatchLoader

    return BatchLoader(digits.train, 64, shuffle=True, seed=seed, views=views,
                       augment=build_augment({"shift": 1}, fill=digits.black))


def metric_rows(path):
    """metrics.jsonl's records without their timings (for exact comparisons)."""
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("epoch_s", None)
    return rows
