-- An application's table, as compose.yaml's worker expects it: your rows, with a column the
-- worker fills. vector(512) is the dimension of ViT-B-32; use your model's (`clipsearch info`).
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS products (
    id bigserial PRIMARY KEY,
    title text,
    image_url text NOT NULL,
    embedding vector(512),
    embedding_status text DEFAULT 'pending',
    embedding_error text,
    model_version text
);
