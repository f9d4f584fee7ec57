# vllm-chill: the proxy image (`examples/kubernetes-with-model-switching.yaml` runs it).
# No registry publishes it: its name, localhost/vllm-chill:<version>, is a local one that no
# pull can resolve to someone else's image. Build it, then side-load it or push it:
#
#   docker build -t localhost/vllm-chill:0.1.0 .
#   docker run --rm -p 8080:8080 -v "$PWD/manifests/examples:/models:ro" \
#     localhost/vllm-chill:0.1.0 serve --backend sim --models /models

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY vllm_chill ./vllm_chill
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[kubernetes]'

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels 'vllm-chill[kubernetes]' \
 && rm -rf /wheels \
 && groupadd --system --gid 10001 vllm-chill \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin vllm-chill
# Numeric, so that `runAsNonRoot` can verify it without looking the name up.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["vllm-chill"]
CMD ["serve"]
