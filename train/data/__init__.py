"""Reading shards for training: the streaming dataset, its loader, whole patients.

    from train.data import ShardDataset, ShardLoader, iter_patients

Modules: `dataset` (`ShardDataset`: an epoch's slices, streamed with bounded memory), `loader`
(`ShardLoader`: its batches packed by the workers in shared memory), `patients` (`iter_patients`:
whole patients for 3D scoring), `slices` (2.5D stacking), `selection` (splits, channels, rank).
"""

from .dataset import ShardDataset
from .loader import ShardLoader
from .patients import PatientSlices, iter_patients
from .slices import stack_context, stack_volume

__all__ = ["PatientSlices", "ShardDataset", "ShardLoader", "iter_patients", "stack_context", "stack_volume"]
