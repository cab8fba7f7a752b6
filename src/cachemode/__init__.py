"""cachemode: understand, test and measure write caching.

Three parts share one vocabulary, the cache-mode table in :mod:`cachemode.modes`:

* :mod:`cachemode.disk`, a virtual disk stack over a raw image with QEMU's exact cache-mode semantics;
* :mod:`cachemode.nbd`, a sans-IO NBD protocol core and an asyncio server over that stack;
* :mod:`cachemode.lab`, emulated volatile caches, power cuts and crash-state exploration;
* :mod:`cachemode.cpu`, a trace-driven, Dinero IV-exact CPU cache simulator.
"""

__version__ = "0.1.0"
