"""The pipeline's stages: each imports core, datasets and io, never another stage."""
