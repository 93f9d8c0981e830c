# hf_distill on a CUDA PyTorch base; run recipes with `accelerate launch`.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/huggingface

WORKDIR /opt/hf_distill
COPY pyproject.toml README.md ./
COPY hf_distill ./hf_distill
COPY tasks ./tasks
COPY scripts ./scripts
COPY configs ./configs
RUN pip install --no-cache-dir "./[compress,generation]"

WORKDIR /workspace
ENTRYPOINT ["accelerate", "launch"]
CMD ["/opt/hf_distill/scripts/distill_glue.py", "--help"]
