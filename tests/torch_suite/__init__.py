"""PyTorch's own batch-norm tests, run against our modules.

``test_module_info.py`` takes the ``ModuleInfo`` entries of ``torch.nn.BatchNorm1d/2d/3d`` from
``torch.testing._internal.common_modules.module_db`` (they ship in the wheel), swaps in
``batchnorm.BatchNorm1d/2d/3d`` and runs the generic checks of upstream's ``test/test_modules.py``
on every input the entries generate. ``test_nn_batchnorm.py`` ports the batch-norm tests of
upstream's ``test/test_nn.py`` that apply to a CPU module. Both are written in our words; torch's
helpers (gradcheck, freeze_rng_state, the entries' input generators) are used where they exist.

``differences.py`` is the one list of places where we differ from torch on purpose; each
matching test is an expected failure (strict) with the reason given there.
"""
