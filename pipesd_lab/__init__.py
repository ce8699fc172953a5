"""The lab: the paper's evaluation and the tools to run it, kept out of the SDK an app embeds.

* ``bench`` -- ``pipesd bench``: methods x scenarios x model pairs, real models, a real verifier.
* ``energy_bench`` -- ``pipesd energy``: joules per output token of each method, edge and cloud.
* ``scenarios`` -- the paper's S1-S4 as link profiles and device speeds, in two regimes.
* ``emulation`` -- an emulated link in front of a real verifier (``EmulatedLink``), a slower device
  (``SlowedDrafter``); ``linkproxy`` -- the same link as a TCP proxy (``pipesd link``).
* ``inprocess`` and ``toy`` -- the real verifier service behind the edge's ``Verifier`` protocol without
  a server, over a tiny deterministic model pair: the engine's logic tested in milliseconds.

It may import every side (``edge_sdk``, ``cloud_verifier``, ``energy``); neither side imports it.
Install it with ``pip install 'pipesd[bench]'``.
"""
