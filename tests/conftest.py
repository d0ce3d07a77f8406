import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under the interpreter. @triton.jit reads this when a function
    # is defined -- triton's own library functions included, at `import triton.language` -- so it must
    # be set before anything (diffusers, inductor) imports triton: here, before any test module.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


@pytest.fixture
def poison():
    """Fills every tensor the kernels allocate with NaN (max int for integer tensors), so an element a
    kernel forgets to write shows up instead of passing with whatever the allocator left there."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev_det)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill
