"""The fast paths behind the tensor ops, launched by the op modules one level up.

``route_triton``, ``rows_triton`` and ``aggregate_triton`` hold the Triton kernels of ``route``,
``dispatch`` / ``combine`` (which share theirs: each op's gradient is the other) and ``aggregate``;
importing one imports Triton (set ``TRITON_INTERPRET=1`` first to run the kernels on CPU tensors).
``rows`` holds the grouped-row primitives of ``dispatch`` and ``combine`` on either backend.
"""
