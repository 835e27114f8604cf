"""The executors: sequential (the reference) and distributed (per-rank
programs over MPI), the optimiser and learning-rate schedules."""
