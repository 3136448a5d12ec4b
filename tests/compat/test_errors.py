"""Bad input through the vendor's layer reaches the user as our clear errors (rebel.errors):
wrong input shape, batch over the compiled one, a model too large for device DRAM, an unknown NPU."""
from __future__ import annotations

import pytest
import torch

import optimum.rbln
import rebel


def _bert(tmp_path, **cfg):
    from transformers import BertConfig, BertModel
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64)
    base.update(cfg)
    torch.manual_seed(0)
    BertModel(BertConfig(**base)).eval().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _vit(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8,
                                        num_labels=3)).eval().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_wrong_sequence_length_names_the_input_and_both_shapes(tmp_path):
    model = optimum.rbln.RBLNBertModel.from_pretrained(_bert(tmp_path), export=True,
                                                       rbln_max_seq_len=16)
    ids = torch.ones(1, 12, dtype=torch.long)
    with pytest.raises(rebel.InputError, match=r"input_ids.*\[1, 12\].*compiled for shape \[1, 16\]"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))


def test_batch_over_compiled_names_the_batch(tmp_path):
    model = optimum.rbln.RBLNViTForImageClassification.from_pretrained(
        _vit(tmp_path), export=True, rbln_image_size=32, rbln_batch_size=1)
    with pytest.raises(rebel.InputError, match=r"pixel_values.*\[2, 3, 32, 32\].*\[1, 3, 32, 32\]"):
        model(pixel_values=torch.randn(2, 3, 32, 32))
    # the compiled batch itself still runs after the refused call
    assert model(pixel_values=torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)


def test_unknown_npu_is_refused_at_compile(tmp_path):
    """Compile-only (no runtime): the vendor passes rbln_npu through to rebel, which names it."""
    with pytest.raises(rebel.SpecError, match="RBLN-XYZ") as info:
        optimum.rbln.RBLNBertModel.from_pretrained(_bert(tmp_path), export=True, rbln_max_seq_len=16,
                                                   rbln_npu="RBLN-XYZ", rbln_create_runtimes=False)
    assert "RBLN-CA" in str(info.value), f"the error should list the known products: {info.value}"


def test_npu_other_than_the_device_is_refused_before_compiling(tmp_path):
    """With runtimes, the vendor first asks rebel.get_npu_name(device) and compares: our answer
    (the virtual device's product) makes its own check name both."""
    with pytest.raises(ValueError, match=rf"Device 0 \({rebel.get_npu_name(0)}\).*RBLN-XYZ"):
        optimum.rbln.RBLNBertModel.from_pretrained(_bert(tmp_path), export=True,
                                                   rbln_max_seq_len=16, rbln_npu="RBLN-XYZ")


def test_model_over_device_dram_is_refused_at_load(tmp_path, small_dram_machine):
    """About 26 MiB of fp16 weights on a die with about 19 MiB usable (the main suite's
    small_dram_machine): compiling works, creating the runtime says how much is missing."""
    folder = _bert(tmp_path, vocab_size=50000, hidden_size=256, intermediate_size=256,
                   num_attention_heads=4)
    # the vendor re-raises runtime-creation errors as RuntimeError with our message inside
    with pytest.raises(RuntimeError, match=r"needs 2\d\.\d MiB of device DRAM but rbln:0 has "
                                           r"1\d\.\d MiB free") as info:
        optimum.rbln.RBLNBertModel.from_pretrained(folder, export=True, rbln_max_seq_len=16)
    chain = [info.value.__cause__, info.value.__context__]
    assert any(isinstance(e, rebel.DeviceMemoryError) for e in chain), chain
