"""batchnorm: batch normalization for PyTorch.

An exact, drop-in replacement for ``torch.nn.BatchNorm{1,2,3}d`` with its own math (stable
statistics, closed-form backward, double backward), the variants that answer batch norm's limits,
fast kernels, and a lab that tests batch norm's claims on real data.
"""

from batchnorm import functional
from batchnorm.checkpoint import save_checkpoint
from batchnorm.convert import convert, freeze, unfreeze
from batchnorm.core.running import NonFiniteStatisticsWarning
from batchnorm.dispatch import available_backends, select_backend, use_backend
from batchnorm.modules.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.modules.norm_act import BatchNormAct1d, BatchNormAct2d
from batchnorm.modules.with_act import BatchNormWithAct2d
from batchnorm.variants.cross_iteration import (
    CrossIterationBatchNorm1d,
    CrossIterationBatchNorm2d,
    CrossIterationBatchNorm3d,
    link_preceding,
)
from batchnorm.variants.fold import ChannelAffine, FoldReport, fold
from batchnorm.variants.frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormWithAct2d,
)
from batchnorm.variants.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from batchnorm.variants.precise import precise_bn
from batchnorm.variants.recurrent import BNLSTM, BNLSTMCell, RecurrentBatchNorm
from batchnorm.variants.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule
from batchnorm.variants.sync import SyncBatchNorm, SyncTimeoutError

__version__ = "0.1.0"

__all__ = [
    "BNLSTM",
    "BNLSTMCell",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ChannelAffine",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "FoldReport",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormWithAct2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "RecurrentBatchNorm",
    "RenormSchedule",
    "SyncBatchNorm",
    "SyncTimeoutError",
    "fold",
    "freeze",
    "link_preceding",
    "precise_bn",
    "save_checkpoint",
    "unfreeze",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormWithAct2d",
    "NonFiniteStatisticsWarning",
    "available_backends",
    "convert",
    "functional",
    "select_backend",
    "use_backend",
]
