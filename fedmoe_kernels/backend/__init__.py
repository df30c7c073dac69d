"""Triton kernels of the tensor ops (one module per op family), launched by the thin ops one level up.

Importing a module here imports Triton; set ``TRITON_INTERPRET=1`` first to run the kernels on CPU tensors.
"""
