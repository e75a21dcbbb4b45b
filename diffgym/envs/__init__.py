"""DiffGym's tasks: one file each (state, Warp kernels, functional sim, Gymnasium env)."""
