"""segpipe's core library: models, inference, dense CRF, statistics, metrics and masks.

Pure numpy/torch/pyarrow/fsspec: importing `pipeline` never imports ray or prefect, so every
stage can be called in a plain Python process or a test on a 32x32 image.
"""

__version__ = "0.1.0"
