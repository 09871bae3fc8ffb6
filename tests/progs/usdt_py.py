"""Calls greet 3 times after a line on stdin, for python's USDT probe function__entry.

Python 3.11 reaches its function__entry probe for a call from Python code only while a profile
or trace function is set (its DTrace hooks sit on the tracing path): a no-op one is set
around the calls. Prints "ready" first and "called" after; exits at end of input.
"""
import sys


def greet(n):  # USDT:greet
    return n + 1


print("ready", flush=True)
sys.stdin.readline()
sys.setprofile(lambda *args: None)
for i in range(3):
    greet(i)
sys.setprofile(None)
print("called", flush=True)
sys.stdin.readline()
