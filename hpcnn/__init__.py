"""hpcnn: layer-wise parallel training of convolutional networks with MPI
(Jia et al., ICML 2018)."""
__version__ = "0.1.0"
