"""Measuring this machine for the cost model: ``hpcnn calibrate``.

- ``tiles``: op tiles to time (``TileJob``), timing one, the roofline probes
  and their fit;
- ``links``: MPI latency and bandwidth inside a node and between nodes
  (ping-pong) and the collectives hpcnn uses, in one MPI job on whatever
  layout its launcher gives it;
- ``runtime_sampler``: hpcnn's runtime with P ranks running at once (tiles,
  copies, training steps of synthetic networks), the measurements that
  ``hpcnn.strategy.runtime_fit`` fits the runtime figures to;
- ``command``: the ``hpcnn calibrate`` command, which writes a machine file.

This layer measures (and starts MPI runs); what the measurements mean for
the cost model is computed in ``hpcnn.strategy``, which never imports it.
"""
