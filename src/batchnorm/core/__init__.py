"""The shared math of every batch norm in the package.

- ``layout``: which axis holds the channels, which axes are reduced, accumulation dtypes.
- ``checks``: input validation that raises before anything is modified.
- ``moments``: per-channel batch mean and variance (the one place statistics are computed).
- ``normalize``: the per-channel affine map and its closed-form gradients.
- ``running``: the running-statistics update (momentum or cumulative, non-finite protection).
- ``context``: whether a torch.func transform surrounds the call.
"""
