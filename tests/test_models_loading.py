"""uniref.models.loading and the Qwen-Image conversion: a sharded diffusers folder loads into a model built
on the meta device, in the requested dtype, with every bad folder refused before anything is read; a
trained model goes back to diffusers' own format."""

import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

import uniref
from uniref.models.loading import WeightsError, safetensors_index
from uniref.models.transformer import UniRefTransformer2DModel
from uniref.testing.qwen import TINY_TRANSFORMER

TINY = {**TINY_TRANSFORMER, **{"joint_attention_dim": 32, "num_layers": 3}}


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    return diffusers.QwenImageTransformer2DModel(**TINY).eval()


@pytest.fixture
def sharded(qwen, tmp_path):
    """The model saved as diffusers saves a large one: bf16 shards plus their index."""
    folder = tmp_path / "qwen"
    qwen.to(torch.bfloat16).save_pretrained(folder, max_shard_size="40KB")
    qwen.float()
    assert len(list(folder.glob("*.safetensors"))) > 2
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return folder


def _forward(model, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    tokens, layout = uniref.pack_latents([[torch.randn(4, 4, 6, generator=g), torch.randn(4, 2, 2, generator=g)]])
    text = torch.randn(5, 32, generator=g)
    with torch.no_grad():
        return model(tokens.to(dtype), text.to(dtype), torch.tensor([0.4], dtype=dtype), layout, [5])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32])
def test_sharded_folder_loads_in_the_requested_dtype(sharded, dtype):
    ours = UniRefTransformer2DModel.from_qwenimage(sharded, torch_dtype=dtype, attention_backend="cpu")
    stored = {}
    for shard in sharded.glob("*.safetensors"):
        stored.update(load_file(shard))
    state = ours.state_dict()
    assert state.keys() == stored.keys()
    for name, tensor in state.items():
        assert tensor.device.type == "cpu" and tensor.dtype == (dtype or torch.bfloat16), name
        assert torch.equal(tensor, stored[name].to(tensor.dtype)), name
    assert not ours.training and torch.isfinite(_forward(ours, dtype or torch.bfloat16).float()).all()


def test_a_loaded_model_is_converted_without_a_copy(qwen):
    ours = UniRefTransformer2DModel.from_qwenimage(qwen)
    theirs = qwen.state_dict()
    assert all(t.data_ptr() == theirs[name].data_ptr() for name, t in ours.state_dict().items())
    half = UniRefTransformer2DModel.from_qwenimage(qwen, torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and qwen.dtype == torch.float32  # the source is left as it was


def _corrupt_shape(folder):
    shard = sorted(folder.glob("*-00001-of-*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3, dtype=torch.bfloat16)
    save_file(tensors, shard)
    return name


def _drop_tensor(folder):
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    spec = json.loads(index.read_text())
    name = sorted(spec["weight_map"])[-1]
    shard = folder / spec["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard)
    index.write_text(json.dumps(spec))
    return name


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda f: (f / "diffusion_pytorch_model.safetensors.index.json").unlink(), "has no diffusion_pytorch_model"),
        (lambda f: sorted(f.glob("*-00002-of-*.safetensors"))[0].unlink(), r"-00002-of-.*is missing"),
        (lambda f: sorted(f.glob("*-00001-of-*.safetensors"))[0].write_bytes(b"garbage"), "not a readable safetensors"),
        (_corrupt_shape, r"-00001-of-\d+\.safetensors: tensor '\S+' has shape \[3, 3\] but the .* expects"),
        (_drop_tensor, r"tensor 'txt_norm\.weight' is missing \(1 missing in all\)"),
        (
            lambda f: (f / "config.json").write_text(
                json.dumps({**json.loads((f / "config.json").read_text()), "num_layers": 2})
            ),
            "is not part of the UniRefTransformer2DModel",
        ),
        (
            lambda f: (f / "config.json").write_text(
                json.dumps({**json.loads((f / "config.json").read_text()), "use_layer3d_rope": True})
            ),
            "use_layer3d_rope",
        ),
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
        (lambda f: (f / "config.json").write_text("{"), "is not valid JSON"),
    ],
    ids=[
        "no-index",
        "missing-shard",
        "corrupt-shard",
        "wrong-shape",
        "missing-tensor",
        "fewer-layers",
        "unsupported-option",
        "no-config",
        "bad-config",
    ],
)
def test_bad_folders_are_refused_with_the_file_and_the_tensor(sharded, damage, message):
    damage(sharded)
    with pytest.raises(WeightsError, match=message):
        UniRefTransformer2DModel.from_qwenimage(sharded)


def test_index_lists_every_tensor_with_its_shard_and_shape(sharded, qwen):
    index = safetensors_index(sharded)
    assert {k: v[1] for k, v in index.items()} == {k: tuple(v.shape) for k, v in qwen.state_dict().items()}
    assert {v[0].name for v in index.values()} == {p.name for p in sharded.glob("*.safetensors")}


def test_save_as_diffusers_round_trips_and_diffusers_loads_it(qwen, tmp_path):
    ours = UniRefTransformer2DModel(**TINY, zero_cond_t=True, attention_backend="cpu").eval()
    ours.save_pretrained(tmp_path / "out", format="diffusers")
    theirs = diffusers.QwenImageTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert theirs.config.zero_cond_t and theirs.config.num_layers == 3
    for (name, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(theirs.state_dict().items())):
        assert torch.equal(a, b), name
    back = UniRefTransformer2DModel.from_qwenimage(tmp_path / "out", attention_backend="cpu")
    assert torch.equal(_forward(back), _forward(ours))
    with pytest.raises(ValueError, match="msrope only"):
        UniRefTransformer2DModel(**TINY, rope_scheme="corner").to_qwenimage()
    with pytest.raises(ValueError, match="format must be"):
        ours.save_pretrained(tmp_path / "x", format="ckpt")


def test_a_qwen_pipeline_folder_loads_its_transformer_from_the_shards(tmp_path):
    """`UniRefEditPipeline.from_qwenimage_edit_folder` (what `model.qwen_image_edit`, the shipped Qwen
    templates' source, runs): the transformer comes from the folder's shards in its stored dtype, the rest
    through diffusers. A tiny random pipeline (the real 20B folder would need 40 GB of disk); its processor,
    which cannot be saved without torchvision, is passed in as a component."""
    from uniref.pipelines import UniRefEditPipeline
    from uniref.testing.qwen import tiny_qwen_edit_plus

    qwen = tiny_qwen_edit_plus()
    folder = tmp_path / "qwen"
    qwen.transformer.to(torch.bfloat16).save_pretrained(folder / "transformer", max_shard_size="40KB")
    qwen.transformer.float()
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(qwen, name).save_pretrained(folder / name)
    qwen.save_config(folder)
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 1
    pipe = UniRefEditPipeline.from_qwenimage_edit_folder(folder, target_pixels=64 * 64, processor=qwen.processor)
    assert pipe.transformer.dtype == torch.bfloat16
    for name, tensor in pipe.transformer.state_dict().items():
        assert torch.equal(tensor, qwen.transformer.state_dict()[name].to(torch.bfloat16)), name
    assert pipe.text_encoder.embed_dim == 16
