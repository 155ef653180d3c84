FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY audience_server ./audience_server
COPY migrations ./migrations
RUN pip install --no-cache-dir -e .
ENV AUDIENCE_HOST=0.0.0.0
EXPOSE 8000
CMD ["audience-server", "serve"]
