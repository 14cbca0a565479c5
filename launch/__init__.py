"""Launch layer: expands a study grid (gin/grids/*.gin) into runs and stages, runs them on this machine or
on Cloud TPU VMs, and reports their progress. `python -m launch --help`; the naming of runs and the
"Scale Efficiently" variants are defined in launch/grid.py.

Importing the package registers the gin configurables launch.Grid, launch.Local and launch.TpuVm (grid
files say `import launch`). Nothing here imports JAX or TensorFlow.
"""

from launch import grid, local, tpu_vm  # noqa: F401  (registers the configurables)
