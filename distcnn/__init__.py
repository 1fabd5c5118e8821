"""distcnn: a data-parallel CNN trainer in pure NumPy over MPI.

Importing the package imports nothing heavy: the command-line entry points set the number of
BLAS threads before NumPy starts its thread pool.
"""

__version__ = "0.1.0"
