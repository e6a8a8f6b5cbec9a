"""The HTTP server (``maskrcnn-serving serve``): SageMaker's serving contract over the inference pipeline.

* :mod:`.process`: the processes of ``serve``: the model check, gunicorn and nginx, supervised, dying with it;
* :mod:`.front`: nginx in front of gunicorn (its config from the settings);
* :mod:`.app`: the Flask app of one worker: routes, errors -> HTTP (one handler), request logs and metrics;
* :mod:`.runtime`: the model lifecycle of one worker: load, warm up, readiness, the pipeline it serves;
* :mod:`.guards`: what keeps one request's trouble inside that request (body reading, memory);
* :mod:`.gunicorn_worker`: the gunicorn worker class (slow clients, JSON error pages);
* :mod:`.logs`, :mod:`.metrics`: JSON log lines, Prometheus metrics across workers.
* :mod:`.web`: the web page at ``GET /`` (plain HTML/CSS/JS in ``web/``, package data).
"""
