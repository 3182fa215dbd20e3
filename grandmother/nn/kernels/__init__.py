"""Locally connected kernels: one interface (grandmother/kernels/base.py), several registered implementations.

    get_kernel("auto", "cpu")     the highest-priority kernel registered for the device type
    get_kernel("reference")       unfold + batched matmul, the ground truth for tests
    kernel_names("cuda")          every kernel that runs on the device type, fastest first

Each implementation module registers itself on import; adding a kernel is one module and one import here.
"""
from grandmother.nn.kernels.base import (LocallyConnectedKernel, PrimitiveKernel, get_kernel, kernel_names,  # noqa: F401
                   register_kernel, registered_names, tile_bytes, unavailable_reason)
from grandmother.nn.kernels import reference, rowshift, tiled, native  # noqa: F401,E402  (each registers its kernel)
