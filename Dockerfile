# clipsearch on the CPU, without torch: ONNX towers (Immich's published models, or your own
# `clipsearch models export` folder). Every step is scripts/container.sh, which the tests run.
#   docker build -t clipsearch .
#   docker run -p 8080:8080 -v clipsearch-data:/data -v clipsearch-cache:/cache clipsearch
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM python:3.12-slim
ARG EXTRAS=postgres,faiss
ENV CLIPSEARCH_VENV=/opt/clipsearch \
    PYTHONUNBUFFERED=1
COPY scripts/container.sh /usr/local/bin/container.sh
COPY --from=build /dist /dist
RUN CLIPSEARCH_EXTRAS="$EXTRAS" container.sh install "$(ls /dist/clipsearch-*.whl)" \
    && rm -rf /dist \
    && useradd --system --uid 10001 --create-home --home-dir /home/clipsearch clipsearch \
    && mkdir -p /data /cache \
    && chown clipsearch:clipsearch /data /cache
USER clipsearch
# the database (SQLite) and the model caches (Hugging Face hub, ONNX exports) outlive the container
VOLUME ["/data", "/cache"]
EXPOSE 8080
# /health is 200 once the model is loaded (503 while it loads): the first start downloads it
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["container.sh", "health"]
ENTRYPOINT ["container.sh", "start"]
CMD ["serve"]
