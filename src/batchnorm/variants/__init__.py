"""Batch norm variants that answer its limits: small or odd batches (renorm, ghost, masked),
fine-tuning and inference (frozen, precise statistics, folding), recurrent networks.

Each variant is a small difference over ``batchnorm.functional``'s building blocks
(``normalize_with_batch_statistics``, ``normalize_with``) and ``batchnorm.core``'s moments and
running update: no variant computes statistics of its own.
"""
