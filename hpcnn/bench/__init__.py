"""Benchmarks that compare hpcnn with PyTorch (as a peer, imported only
here and only when a benchmark runs) and with plain MPI."""
