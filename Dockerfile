FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY audience_server ./audience_server
# A plain install, as from a wheel: the migrations ship inside the package.
RUN pip install --no-cache-dir .
ENV AUDIENCE_HOST=0.0.0.0
EXPOSE 8000
CMD ["audience-server", "serve"]
