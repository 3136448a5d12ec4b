"""Encoder models (BERT family): one graph at (batch_size, max_seq_len); inputs are padded."""
from __future__ import annotations

import torch
from transformers import AutoModel, AutoModelForSequenceClassification
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

import rebel
from rebel import InputError

from .configuration import RBLNConfig
from .modeling import RBLNModel


class _Encoder(torch.nn.Module):
    """Fixed-signature wrapper: the model's outputs as a plain tuple of tensors."""

    def __init__(self, model, fields: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.fields = fields

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids, return_dict=True)
        return tuple(out[f] for f in self.fields)


class RBLNEncoderModel(RBLNModel):
    model_types = ("bert", "roberta", "distilbert")
    is_decoder = False
    output_fields: tuple[str, ...] = ()

    @classmethod
    def _compile(cls, model, options: RBLNConfig):
        shape = (options.batch_size, options.max_seq_len)
        inputs = [torch.zeros(shape, dtype=torch.long), torch.ones(shape, dtype=torch.long),
                  torch.zeros(shape, dtype=torch.long)]
        compiled = rebel.compile_from_torch(_Encoder(model, cls.output_fields).eval(), example_inputs=inputs,
                                            npu=options.npu, device_dtype=options.device_dtype,
                                            tensor_parallel_size=options.tensor_parallel_size)
        return {"model": compiled}

    def _run(self, input_ids, attention_mask=None, token_type_ids=None):
        input_ids = torch.as_tensor(input_ids).long()
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        b, n = input_ids.shape
        o = self.rbln_config
        if b > o.batch_size or n > o.max_seq_len:
            raise InputError(f"input of shape {[b, n]} does not fit the compiled "
                             f"[rbln_batch_size={o.batch_size}, rbln_max_seq_len={o.max_seq_len}]")
        shape = (o.batch_size, o.max_seq_len)
        ids, mask, types = (torch.zeros(shape, dtype=torch.long) for _ in range(3))
        ids[:b, :n] = input_ids
        mask[:b, :n] = 1 if attention_mask is None else torch.as_tensor(attention_mask).long()
        if token_type_ids is not None:
            types[:b, :n] = torch.as_tensor(token_type_ids).long()
        outputs = self._runtime().run(ids, mask, types)
        return [t[:b, :n] if t.dim() >= 2 and t.shape[1] == o.max_seq_len else t[:b] for t in outputs]

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class RBLNBertModel(RBLNEncoderModel):
    hf_auto_class = AutoModel
    output_fields = ("last_hidden_state", "pooler_output")
    model_types = ("bert",)

    @classmethod
    def _check_config(cls, config, options: RBLNConfig) -> None:
        config.add_pooling_layer = True

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> BaseModelOutputWithPooling:
        hidden, pooled = self._run(input_ids, attention_mask, token_type_ids)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


class RBLNBertForSequenceClassification(RBLNEncoderModel):
    hf_auto_class = AutoModelForSequenceClassification
    output_fields = ("logits",)
    model_types = ("bert",)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> SequenceClassifierOutput:
        (logits,) = self._run(input_ids, attention_mask, token_type_ids)
        return SequenceClassifierOutput(logits=logits)
