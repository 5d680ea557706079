"""Tools around the core: the ``tome-fx`` CLI, the demo, benchmarks (``bench``, ``grid_bench``),
evaluation, visualisation, the model zoo and the Fashion-MNIST reference models."""
