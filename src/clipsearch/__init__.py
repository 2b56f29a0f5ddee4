"""clipsearch: self-hosted CLIP embeddings and semantic image search.

Data flows one way: sources -> imaging (decode) -> encoders -> store/index -> search -> CLI/API.
"""

__version__ = "0.1.0"
