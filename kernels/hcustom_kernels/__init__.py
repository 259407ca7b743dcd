"""Triton kernels: the memory-bound glue around the DiT's attention, and ring attention's fused tile.

Each kernel module holds the Triton kernels, an autograd.Function (the ring tile: the forward and
backward that ring attention's own Function calls), a PyTorch reference, and input validation. On machines without CUDA the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported), which is what the CPU tests use.
"""
