# The tuner image. TORCH picks the PyTorch build: cu128 (CUDA 12.8, the default) or cpu:
#   docker build --build-arg TORCH=cpu -t tuner .
FROM python:3.11-slim

ARG TORCH=cu128
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 tuner \
    && mkdir -p /app /checkpoints /artifacts \
    && chown tuner /app /checkpoints /artifacts
WORKDIR /app

RUN python -m pip install --no-cache-dir "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH}"
COPY pyproject.toml README.md ./
COPY tuner ./tuner
RUN python -m pip install --no-cache-dir .
COPY studies ./studies

USER tuner
CMD ["tuner", "--help"]
