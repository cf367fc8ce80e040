"""One implementation of each op per backend (docs/OPS.md): ``reference`` (PyTorch float64, the oracle),
``cpp`` (the C++ CPU kernel, ``csrc/``) and, outside this package, ``triton`` (``kernels/``, installed as
``manu_fast.kernels``); ``contract`` holds the preconditions they all assert. ``manu_fast.ops`` is the one
dispatch point."""
