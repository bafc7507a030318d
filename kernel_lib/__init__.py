"""kernel_lib: the shared library of the RxRx1 (CellSignal) notebook suite.

One module per concern; import what you need, e.g. ``from kernel_lib import rxrx_io as rio``.
This package imports nothing heavy at import time so that notebooks and tools start fast.
"""

__version__ = "0.1.0"
