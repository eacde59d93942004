"""Retrieval-augmented generation over Python's documentation.

Read in this order: ``passages`` (the help topics cut into passages, by fixed rules),
``embed`` (MiniLM sentence embeddings, cached on disk), ``search`` (exact top-k by cosine
similarity, and the BM25 keyword baseline), ``questions`` (a fixed question set with known
answers), ``metrics`` (recall@k), ``answer`` (a decoder answering from the passages).
"""

from qkv.rag.answer import answer, build_prompt, load_generator
from qkv.rag.embed import Encoder, embed_passages
from qkv.rag.metrics import hits, random_recall, recall_at_k
from qkv.rag.passages import Passage, python_docs_topics, split_topics
from qkv.rag.questions import Question, build_questions
from qkv.rag.search import BM25, keywords, search, search_reference

__all__ = [
    "BM25",
    "Encoder",
    "Passage",
    "Question",
    "answer",
    "build_prompt",
    "build_questions",
    "embed_passages",
    "hits",
    "keywords",
    "load_generator",
    "python_docs_topics",
    "random_recall",
    "recall_at_k",
    "search",
    "search_reference",
    "split_topics",
]
