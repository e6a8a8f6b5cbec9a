"""Benchmarks: the in-process model pipeline, HTTP load against an endpoint, and A/B comparisons in one run.

Modules:
    images     synthetic test images (JPEG bytes) and masks, generated in-process
    stats      percentiles, peak resident memory, machine description
    workload   requests through the serving pipeline, timed by its stages: decode -> preprocess -> queue -> model ->
               postprocess -> encode
    model      ``bench model``: throughput, latency and the stage breakdown per image size and batch size
    traffic    real traffic: a seeded stream of photos of mixed sizes and orientations (``--stream``)
    seed_rle   the seed containers' ``groupby`` row-major RLE encoder, kept only as the comparison baseline
    compare    ``bench compare``: two pipelines, or two RLE encoders, interleaved in one run
    loadgen    ``bench http``: closed-loop and open-loop load against a URL or a SageMaker endpoint
    plots      PNG figures (matplotlib, Agg backend)
    report     tables for people

The live server and the hostile-input catalogue that the tests and benchmarks/ use are test material, in the
repository's ``testsupport/`` package (not installed).
"""
