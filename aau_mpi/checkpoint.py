"""`aau_mpi.checkpoint.load_model`: the final model of a run (<run>/model.h5), by its documented name.

The model file lives with the models (training/models.py); the checkpoints'
HDF5 format with the optimizer (decentralized/checkpoint.py).
"""

from aau_mpi.training.models import load_model

__all__ = ["load_model"]
