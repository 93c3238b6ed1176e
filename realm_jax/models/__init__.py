"""Flax NNX models: BERT, the REALM retriever, knowledge-augmented encoder and ORQA reader."""

from realm_jax.models.bert import BertEncoder, MlmHead
from realm_jax.models.encoder import KnowledgeAugEncoder, marginal_log_likelihood
from realm_jax.models.reader import SpanReader, openqa_losses, predict_span
from realm_jax.models.realm import OpenQAModel, RealmModel
from realm_jax.models.retriever import Retriever, RetrieverEmbedder, relevance_scores

__all__ = ["BertEncoder", "KnowledgeAugEncoder", "MlmHead", "OpenQAModel", "RealmModel", "Retriever",
           "RetrieverEmbedder", "SpanReader", "marginal_log_likelihood", "openqa_losses", "predict_span",
           "relevance_scores"]
