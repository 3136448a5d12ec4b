"""optimum.rbln: Hugging Face models compiled for RBLN NPUs (here: the virtual ATOM).

    model = RBLNLlamaForCausalLM.from_pretrained(path, export=True, rbln_batch_size=4,
                                                 rbln_max_seq_len=2048, rbln_prefill_chunk_size=128)
    model.save_pretrained("compiled")
    model = RBLNLlamaForCausalLM.from_pretrained("compiled")   # export=False is detected
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
"""
from .auto import RBLNAutoModelForCausalLM
from .configuration import RBLNConfig, RBLNConfigError
from .decoder_only.modeling import (GenerationReport, RBLNDecoderOnlyModelForCausalLM,
                                    RBLNLlamaForCausalLM, RBLNMistralForCausalLM, RBLNQwen2ForCausalLM,
                                    RBLNQwen3ForCausalLM)
from .encoders import RBLNBertForSequenceClassification, RBLNBertModel
from .modeling import RBLNModel

__all__ = ["GenerationReport", "RBLNAutoModelForCausalLM", "RBLNBertForSequenceClassification",
           "RBLNBertModel", "RBLNConfig", "RBLNConfigError", "RBLNDecoderOnlyModelForCausalLM",
           "RBLNLlamaForCausalLM", "RBLNMistralForCausalLM", "RBLNModel", "RBLNQwen2ForCausalLM",
           "RBLNQwen3ForCausalLM"]
