"""NBD: a sans-IO protocol core (handshake, requests, validation, replies) and an asyncio server over it.

The core modules (:mod:`constants`, :mod:`export`, :mod:`handshake`, :mod:`requests`, :mod:`validate`,
:mod:`replies`) never touch a socket or a clock; :mod:`server` is the only one that does I/O.
"""
