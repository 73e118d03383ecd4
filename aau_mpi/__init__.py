"""aau_mpi: decentralized, asynchronous deep-learning training on MPI (DSGD-AAU).

Layers, bottom to top (each concept in one module):
  world      - MPI start-up, node-local rank, device and torch threads
  mailbox    - one-sided RMA windows: deposit, header snapshot, consistent read
  topology   - communication graphs and mixing weights
  policies   - pure decision logic over header snapshots (which neighbours to mix)
  engine     - the iteration of spec section 3 over a flat parameter vector
"""

__version__ = "0.1.0"
