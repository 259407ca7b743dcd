"""Triton kernels: the memory-bound glue around the DiT's attention, and ring attention's fused tile.

Each kernel module holds the Triton kernels, an autograd.Function, a PyTorch reference with the same
signature, and input validation. On machines without CUDA the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set before triton is imported), which is what the CPU tests use.
"""
