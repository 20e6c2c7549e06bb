"""Checkpoint loading: Hugging Face folders (safetensors, .bin), the authors' .pth, s3://, and every error."""

from __future__ import annotations

import json
import os
import pickle

import fsspec
import pytest
import torch
import transformers

from model import CheckpointError, SegGptConfig, check_checkpoint, load_model

TINY = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    mlp_dim=48,
    image_size=[64, 32],
    patch_size=8,
    pretrain_image_size=24,
    decoder_hidden_size=8,
    merge_index=1,
    intermediate_hidden_state_indices=[1, 3],
)


def authors_names(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under the original BAAI (`models_seggpt.py`) names, written out independently."""
    fixed = {
        "model.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "model.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "model.embeddings.mask_token": "mask_token",
        "model.embeddings.segment_token_input": "segment_token_x",
        "model.embeddings.segment_token_prompt": "segment_token_y",
        "model.embeddings.type_token_semantic": "type_token_cls",
        "model.embeddings.type_token_instance": "type_token_ins",
        "model.embeddings.position_embeddings": "pos_embed",
        "model.encoder.layernorm.weight": "norm.weight",
        "model.encoder.layernorm.bias": "norm.bias",
        "decoder.decoder_embed.weight": "decoder_embed.weight",
        "decoder.decoder_embed.bias": "decoder_embed.bias",
        "decoder.decoder_pred.conv.weight": "decoder_pred.0.weight",
        "decoder.decoder_pred.conv.bias": "decoder_pred.0.bias",
        "decoder.decoder_pred.layernorm.weight": "decoder_pred.1.weight",
        "decoder.decoder_pred.layernorm.bias": "decoder_pred.1.bias",
        "decoder.decoder_pred.head.weight": "decoder_pred.3.weight",
        "decoder.decoder_pred.head.bias": "decoder_pred.3.bias",
    }
    per_layer = {
        "attention.qkv": "attn.qkv",
        "attention.proj": "attn.proj",
        "attention.rel_pos_h": "attn.rel_pos_h",
        "attention.rel_pos_w": "attn.rel_pos_w",
        "mlp.lin1": "mlp.fc1",
        "mlp.lin2": "mlp.fc2",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
    }
    out = {}
    for key, value in hf_state_dict.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        layer, rest = key.removeprefix("model.encoder.layers.").split(".", 1)
        for hf, ours in per_layer.items():
            if rest.startswith(hf):
                out[f"blocks.{layer}.{ours}{rest[len(hf) :]}"] = value
                break
        else:
            raise AssertionError(f"unmapped key {key}")
    return out


@pytest.fixture(scope="module")
def reference() -> transformers.SegGptForImageSegmentation:
    torch.manual_seed(0)
    ref = transformers.SegGptForImageSegmentation(transformers.SegGptConfig(**TINY)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    return tuple(torch.randn(2, 3, 32, 32) for _ in range(3))


@pytest.fixture(scope="module")
def hf_folder(reference, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("hf")
    reference.save_pretrained(folder)
    assert (folder / "model.safetensors").exists()
    return str(folder)


@pytest.fixture(scope="module")
def bin_folder(reference, hf_folder, tmp_path_factory) -> str:
    """config.json from save_pretrained plus pytorch_model.bin, the older save_pretrained's pickle format."""
    folder = tmp_path_factory.mktemp("bin")
    (folder / "config.json").write_text(open(os.path.join(hf_folder, "config.json")).read())
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    return str(folder)


@pytest.fixture(scope="module")
def authors_file(reference, hf_folder, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("baai")
    (folder / "config.json").write_text(open(os.path.join(hf_folder, "config.json")).read())
    path = folder / "seggpt_vit_large.pth"
    torch.save({"model": authors_names(reference.state_dict())}, path)
    return str(path)


def predict(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).pred_masks


def test_every_checkpoint_kind_loads_the_reference_weights(reference, inputs, hf_folder, bin_folder, authors_file):
    expected = predict(reference, inputs)
    outputs = [predict(load_model(uri), inputs) for uri in (hf_folder, bin_folder, authors_file)]
    for out in outputs:
        assert (out - expected).abs().max() <= 1e-5
        assert torch.equal(out, outputs[0])


def test_load_from_s3(s3_bucket, hf_folder, authors_file, inputs):
    bucket, storage_options = s3_bucket
    fs = fsspec.filesystem("s3", **storage_options)
    fs.put(hf_folder, f"{bucket}/models/tiny", recursive=True)
    fs.put(authors_file, f"{bucket}/baai/seggpt_vit_large.pth")
    fs.put(os.path.join(hf_folder, "config.json"), f"{bucket}/baai/config.json")
    local = predict(load_model(hf_folder), inputs)
    for uri in (f"{bucket}/models/tiny", f"{bucket}/baai/seggpt_vit_large.pth"):
        remote = load_model(uri, storage_options=storage_options)
        assert torch.equal(predict(remote, inputs), local)


def test_authors_file_without_config_defaults_to_vit_large(authors_file, tmp_path):
    lone = tmp_path / "seggpt_vit_large.pth"
    lone.write_bytes(open(authors_file, "rb").read())
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped .*patch_embed\.proj\.weight: checkpoint \(32, 3, 8, 8\), "
        r"model \(1024, 3, 16, 16\)",
    ):
        load_model(str(lone))


def test_mismatches_are_named_in_one_error(reference, tmp_path):
    state = authors_names(reference.state_dict())
    del state["blocks.2.attn.qkv.bias"]
    del state["mask_token"]
    state["blocks.9.attn.qkv.weight"] = torch.zeros(3)
    state["decoder_embed.weight"] = torch.zeros(5, 5)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as error:
        load_model(str(tmp_path / "bad.pth"))
    message = str(error.value)
    assert "missing (2): blocks.2.attn.qkv.bias, mask_token" in message
    assert "unexpected (1): blocks.9.attn.qkv.weight" in message
    assert "mis-shaped (1): decoder_embed.weight: checkpoint (5, 5), model (512, 64)" in message


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_model(str(path))
    assert not marker.exists()


def test_folder_errors(tmp_path, hf_folder):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(str(tmp_path / "absent"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(CheckpointError, match="found no model.safetensors"):
        load_model(str(tmp_path))
    empty = tmp_path / "noconfig"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="needs a config.json"):
        load_model(str(empty))


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "float32"])
def test_dtype(hf_folder, dtype):
    model = load_model(hf_folder, dtype=dtype)
    expected = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert all(p.dtype == expected for p in model.parameters())
    assert not model.training


def test_bad_dtype(hf_folder):
    with pytest.raises(ValueError, match="dtype: expected"):
        load_model(hf_folder, dtype="int8")


def test_config_reads_hf_json_and_names_bad_keys(hf_folder):
    config = SegGptConfig.from_json(os.path.join(hf_folder, "config.json"))  # carries many unknown HF keys
    assert config.hidden_size == 32 and config.image_size == [64, 32] and config.mlp_dim == 48
    assert SegGptConfig().mlp_dim == 4096 and SegGptConfig().grid == (56, 28)
    with pytest.raises(TypeError, match="'hidden_size': expected int, got 'big'"):
        SegGptConfig.from_dict({"hidden_size": "big"})
    with pytest.raises(TypeError, match="'qkv_bias': expected bool"):
        SegGptConfig.from_dict({"qkv_bias": 1})
    with pytest.raises(ValueError, match="intermediate_hidden_state_indices"):
        SegGptConfig.from_dict({"merge_index": 6})


def test_check_checkpoint_reads_safetensors_headers_only(hf_folder, tmp_path):
    assert check_checkpoint(hf_folder).hidden_size == 32
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "hidden_size": 64, "num_attention_heads": 4}))
    data = open(os.path.join(hf_folder, "model.safetensors"), "rb").read()
    size = int.from_bytes(data[:8], "little")
    (tmp_path / "model.safetensors").write_bytes(data[: 8 + size])  # the header alone: no tensor data
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped \(\d+\): .*pos_embed: checkpoint \(1, 10, 32\), "
        r"model \(1, 10, 64\)",
    ):
        check_checkpoint(str(tmp_path))


def test_loading_does_not_import_torchs_compiler(hf_folder):
    """The model is built on the meta device and then given the checkpoint's weights: running the random init on
    meta tensors made torch import its compiler, about 3 s at the start of every actor and command."""
    import subprocess
    import sys

    code = (
        "import sys; from model import load_model; load_model(sys.argv[1]); "
        "print(sorted(name for name in sys.modules if name.startswith('torch._dynamo')))"
    )
    out = subprocess.run([sys.executable, "-c", code, hf_folder], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
