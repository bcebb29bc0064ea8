# OpenAI-compatible ChatGLM2 + P-Tuning v2 server. The commands are the README's "Docker" section:
#   CPU (default):  docker build -t chatglm-serve .
#   CUDA:           docker build -t chatglm-serve:cuda --build-arg BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime \
#                       --build-arg TORCH= .
#   run the bundled demo:  docker run --rm -p 8000:8000 chatglm-serve
#   run a real model:      docker run --rm -p 8000:8000 -v /models:/models chatglm-serve \
#                              python -m server --model /models/chatglm2-6b --quantize int4 --checkpoints /models/output
ARG BASE=python:3.11-slim
FROM ${BASE}

# TORCH: the torch requirement installed first from TORCH_INDEX (the CPU wheel; PyPI's Linux wheel is the CUDA
# build). Empty TORCH keeps the base image's torch (the pytorch/pytorch CUDA images). EXTRAS: e.g. [train].
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CHATGLM_HOST=0.0.0.0
WORKDIR /app

RUN if [ -n "$TORCH" ]; then pip install "$TORCH" --index-url "$TORCH_INDEX"; fi
COPY pyproject.toml README.md ./
COPY chatglm chatglm
COPY server server
COPY training training
RUN pip install ".${EXTRAS}"
# The bundled demo base and adapter (a few MB). `python -m server` run from /app finds them at
# /app/checkpoints, its defaults for --model (checkpoints/demo-base) and --checkpoints.
COPY checkpoints checkpoints

RUN useradd --create-home --shell /usr/sbin/nologin chatglm
USER chatglm
EXPOSE 8000
HEALTHCHECK --start-period=120s CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CHATGLM_PORT', '8000') + '/health', timeout=5)"
CMD ["python", "-m", "server", "--host", "0.0.0.0"]
