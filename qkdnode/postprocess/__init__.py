"""Classical post-processing of one block: sifting to identical secret keys.

Pure: numpy and the standard library only; no I/O, no clock, no global randomness. Every random
choice comes from an injected ``numpy.random.Generator`` or an explicit seed.
"""
