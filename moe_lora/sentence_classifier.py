"""A sentence classifier around a sentence-transformers encoder: the pooling its checkpoint was trained with, then
a linear head. ``moe_lora.zoo.load_model("minilm", task="sequence_classification", num_labels=N)`` builds one.

    logits_BC = classifier(mean over the real tokens t of hidden_BSD[b, t])        (pooling 'mean')

transformers' BertForSequenceClassification classifies the [CLS] token through BERT's pooler; a sentence-
transformers checkpoint such as all-MiniLM-L6-v2 was trained to be read by mean pooling instead (its
1_Pooling/config.json), so its [CLS] state carries little of the sentence and its pooler was never trained with
it. Module names follow BertForSequenceClassification (``bert.*`` for the encoder, ``classifier`` for the head), so
target patterns and ``modules_to_save`` carry over. The last step of such a checkpoint (2_Normalize, unit length)
is left out: the head reads the pooled vector itself.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


def mean_pool(hidden_BSD: torch.Tensor, mask_BS: torch.Tensor | None) -> torch.Tensor:
    """[B, D] mean of ``hidden_BSD`` over the positions where ``mask_BS`` is 1 (all positions when None)."""
    if mask_BS is None:
        return hidden_BSD.mean(1)
    m_BS1 = mask_BS.unsqueeze(-1).to(hidden_BSD.dtype)
    return (hidden_BSD * m_BS1).sum(1) / m_BS1.sum(1).clamp_min(1.0)


class SentenceClassifier(nn.Module):
    """``bert`` (an encoder returning last_hidden_state) -> mean pooling -> ``classifier`` Linear(hidden, num_labels).

    ``config`` is the encoder's config with ``num_labels`` set (so ``num_hidden_layers`` and the model name read as
    for any transformers model). ``forward(input_ids, attention_mask, labels=None)`` returns a
    SequenceClassifierOutput whose ``loss`` (labels given) is the mean cross-entropy.
    """

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.bert = encoder
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        kwargs.pop("use_cache", None)  # an encoder has no cache
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits_BC = self.classifier(mean_pool(out.last_hidden_state, attention_mask))
        loss = None if labels is None else nn.functional.cross_entropy(logits_BC.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits_BC)
