"""``batchnorm bench``: ours against torch.nn on a fixed list of shapes, interleaved."""
