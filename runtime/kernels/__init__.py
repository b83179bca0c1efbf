"""CPU kernels and their care, at the bottom of the runtime: the C++ library and its op schemas, linear layers over
packed weights, huge-page memory, OpenMP worker pools and thread counts. Imports nothing from models or the runner."""
