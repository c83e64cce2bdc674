"""brainage_core: the Ray-free library of brainage-study.

Sub-packages: ``grids`` (the exact voxel grids), ``data`` (readers, prepared store, synthetic
cohort, Dataset, augmentations), ``models`` (plain-torch 3D networks), ``losses`` (contrastive
and supervised losses), ``evaluation`` (probes, metrics, challenge scores), ``config`` (typed
experiment configuration), ``training`` (the epoch loop and checkpoints), ``export`` (RAMP
submissions). Nothing here imports Ray.
"""

__version__ = "0.1.0"
