"""Thin nn.Module wrappers over ``batchnorm.functional``."""
