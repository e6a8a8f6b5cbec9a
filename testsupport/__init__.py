"""Test material that is not part of the product: the tests and the scripts in benchmarks/ use it; pip does not install
it (pyproject.toml installs ``maskrcnn_serving`` only) and the images do not copy it.

Modules:
    hostile    hostile files built from scratch, and the hostile-input catalogue: every case with the answer it
               must get (tests/reliability, benchmarks/hostile_memory.py)
    server     a real ``maskrcnn-serving serve`` in a child process, and its processes (tests, benchmarks/soak.py,
               benchmarks/hostile_memory.py)
    load       ``/ping`` timed while a load of the catalogue keeps a server busy (tests/reliability/test_ping_load.py,
               benchmarks/ping_under_load.py)
    ray_cluster
               a real Ray cluster on this machine, and its actors' processes (tests/test_distributed.py,
               benchmarks/ray_scale_out.py)
"""
