# inspectd for a GPU station: the daemon with the TensorRT backend, on NVIDIA's TensorRT container.
#
#   docker build -t inspectd:gpu .
#   docker run -d --name inspectd-line-1 --gpus all --network host --init \
#     -v /etc/inspectd:/etc/inspectd:ro -v /var/lib/inspectd:/var/lib/inspectd \
#     -v /var/cache/inspectd:/var/cache/inspectd inspectd:gpu
#
# Why TensorRT's container and not PyTorch's: the daemon never imports torch (training runs elsewhere), and
# the TensorRT image carries exactly the GPU runtime it needs (CUDA, cuDNN, TensorRT with its Python
# bindings) at a fraction of the PyTorch image's size. The tag pins the TensorRT version, which is part of
# the engine cache key: a new tag rebuilds the engines once. 24.12 and later have Python 3.12 (inspectd
# needs ≥ 3.11); 25.01 = TensorRT 10.8, CUDA 12.8, driver ≥ 570 (or a data-center driver with forward
# compatibility).
ARG TENSORRT_TAG=25.01-py3
FROM nvcr.io/nvidia/tensorrt:${TENSORRT_TAG}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/inspectd/venv \
    PATH=/opt/inspectd/venv/bin:$PATH \
    CUDA_CACHE_PATH=/var/cache/inspectd/cuda

# python3-venv: Ubuntu's Python lacks ensurepip without it. Versions come with the base image's Ubuntu
# release, which the tag above pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid above the image's own users (Ubuntu 24.04 images have "ubuntu" = 1000), so volumes can be
# chowned to it on the host: chown -R 10001:10001 /var/lib/inspectd /var/cache/inspectd.
RUN groupadd --system --gid 10001 inspectd \
    && useradd --system --uid 10001 --gid inspectd --home-dir /var/lib/inspectd --no-create-home \
       --shell /usr/sbin/nologin inspectd \
    && install -d -o inspectd -g inspectd -m 0750 /var/lib/inspectd /var/cache/inspectd /srv/inspectd \
    && install -d -m 0755 /etc/inspectd

# --system-site-packages: the tensorrt Python bindings are installed in the image's system Python; the venv
# sees them and adds inspectd with the gpu extra (cuda-python) on top.
COPY . /tmp/inspectd-src
RUN python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
    && pip install --no-cache-dir "/tmp/inspectd-src[gpu]" \
    && rm -rf /tmp/inspectd-src \
    && inspectd --help >/dev/null

COPY systemd/inspectd.toml /etc/inspectd/inspectd.toml

USER 10001:10001
WORKDIR /var/lib/inspectd

# 9108: /metrics, /healthz, /readyz. 5555: camera PULL, 5556: verdict PUB (the defaults; bound on loopback
# unless the config says otherwise, hence --network host above).
EXPOSE 9108 5555 5556

# /readyz is 200 once the backend is warmed up and the pipeline progresses, 503 otherwise; urlopen raises on
# 503 and on a refused connection. No curl in the image needed. The start period covers loading the plan and
# warming up (seconds), with room for a first start that builds the engine (model.options.rebuild and
# allow_ungated = true: docs/gpu.md).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/readyz', timeout=4)"]

ENTRYPOINT ["/opt/inspectd/venv/bin/inspectd", "serve"]
CMD ["--config", "/etc/inspectd/inspectd.toml"]
