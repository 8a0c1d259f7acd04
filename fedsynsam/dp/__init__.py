"""Data-parallel training on torch.distributed: synchronous DDP, local SGD and DPPF.

M workers (one process per rank, started by ``torchrun`` or ``fedsynsam dp --nproc M``)
each hold a shard of the training set and their own copy of the model:

* ``ddp``: gradients averaged every step by :class:`~torch.nn.parallel.DistributedDataParallel`
  (with fedcomp's communication hook when a compressor is set);
* ``localsgd``: ``sync_every`` (tau) local SGD steps, then every worker takes the average;
* ``dppf``: tau local steps, then each worker is pulled toward the average and pushed away from
  it (:func:`fedsynsam.algorithms.pull_push`), so that the workers span a valley of width about
  ``dppf_lambda / dppf_alpha``.

With a compressor, a synchronisation sends fedcomp payloads (each worker's change since the last
average, with its own error-feedback residual) as bytes over an all-gather, and every worker
decodes them in rank order, so every worker holds the same average to the bit.

:class:`DPConfig` holds the settings, :class:`Synchronizer` the averaging,
:class:`DataParallelTrainer` the run; ``fedsynsam dp`` is the command (:mod:`fedsynsam.dp.cli`).
"""

from .config import DP_COMPRESSORS, DP_PARTITIONS, METHODS, DPConfig

__all__ = ["DPConfig", "METHODS", "DP_COMPRESSORS", "DP_PARTITIONS", "Synchronizer", "DataParallelTrainer"]


def __getattr__(name):
    if name == "Synchronizer":
        from .sync import Synchronizer

        return Synchronizer
    if name == "DataParallelTrainer":
        from .trainer import DataParallelTrainer

        return DataParallelTrainer
    raise AttributeError(name)
