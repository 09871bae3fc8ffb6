"""Leaks 1500 bytearrays of 100,000 bytes, kept in a global list until exit.

Each is larger than pymalloc's 512-byte limit, so CPython takes its buffer from malloc, and
of a size nothing else in the interpreter asks for: the test finds them by size. Their C
stacks run through the interpreter's evaluation loop to Py_BytesMain, in Debian's python3.11,
which is built without frame pointers.
"""
import os

KEPT = []


def leak():
    for _ in range(1500):
        KEPT.append(bytearray(100_000))


leak()
# Out without finalization, which would free the list: what it holds is still held at exit.
os._exit(0)
