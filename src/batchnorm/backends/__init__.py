"""Implementations of the batch norm kernels. Which one runs is decided in ``batchnorm.dispatch``.

Every backend offers the same four operations (see ``batchnorm.dispatch.Backend``):
training forward (batch statistics), eval forward (given statistics), and their backwards.
"""
