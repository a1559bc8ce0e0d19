"""What the GPU backends (TRELLIS, TRELLIS.2) share, one module per job:

- `base`: the load / generate / health skeleton (`GpuBackend`);
- `weights`: pinned weight sources, `fetch` and `verify` (`photo3d weights`);
- `paths`: where weights are on this machine and how pipelines load them offline;
- `options`: generation options in the pipelines' terms;
- `images`: preparing photos, warm-up input, GLB bytes;
- `torch_helpers`: CUDA checks, memory, timings, progress.

Nothing here imports torch or the TRELLIS packages at import time.
"""
