"""Loading a saved pipeline whose files do not fit together: every missing, unexpected or mis-shaped tensor
is a PipelineLoadError naming the file and the tensor (uniref.pipelines.loading), also through `uniref edit`;
and every loader opens safetensors only."""

import json
import shutil

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from uniref.cli import main
from uniref.pipelines import PipelineLoadError, QwenVLPromptEncoder, UniRefEditPipeline
from uniref.presets import random_edit_pipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    random_edit_pipeline("tiny", seed=0).save_pretrained(folder)
    return folder


def _copy(saved, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    return folder


def _edit_weights(folder, component, change):
    file = folder / component / WEIGHTS
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)
    return file


def test_a_complete_folder_loads(saved):
    assert isinstance(UniRefEditPipeline.from_pretrained(saved), UniRefEditPipeline)


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_a_missing_tensor_is_named(component, saved, tmp_path):
    folder = _copy(saved, tmp_path)
    dropped = []
    file = _edit_weights(folder, component, lambda t: dropped.append(sorted(t)[-1]) or t.pop(dropped[0]))
    with pytest.raises(PipelineLoadError, match=rf"{file}: tensor '{dropped[0]}' is missing \(1 missing in all\)"):
        UniRefEditPipeline.from_pretrained(folder)


def test_a_misshaped_tensor_is_named(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    key = []

    def shrink(t):
        key.append(next(k for k, v in sorted(t.items()) if v.dim() == 2))
        t[key[0]] = t[key[0]][:-1].clone()

    file = _edit_weights(folder, "transformer", shrink)
    with pytest.raises(
        PipelineLoadError,
        match=rf"{file}: tensor '{key[0]}' has shape \[\d+, \d+\] but the "
        r"UniRefTransformer2DModel described by .* expects",
    ):
        UniRefEditPipeline.from_pretrained(folder)


def test_a_config_with_fewer_layers_than_the_weights_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    last = config["num_layers"] - 1
    config["num_layers"] = last
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        PipelineLoadError,
        match=rf"tensor '[a-z_]+\.{last}\..*' is not part of the "
        r"UniRefTransformer2DModel .* \(e\.g\. fewer layers\)",
    ):
        UniRefEditPipeline.from_pretrained(folder)


def test_a_corrupt_header_is_named(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "vae" / WEIGHTS).write_bytes(b"\xff" * 64)
    where = folder / "vae" / WEIGHTS
    with pytest.raises(PipelineLoadError, match=rf"a file is corrupt: {where} is not a readable safetensors file"):
        UniRefEditPipeline.from_pretrained(folder)


def test_uniref_edit_reports_the_tensor(saved, tmp_path, capsys):
    folder = _copy(saved, tmp_path)
    _edit_weights(folder, "transformer", lambda t: t.pop(sorted(t)[0]))
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    out = tmp_path / "out.png"
    rc = main(
        ["edit", "--image", str(tmp_path / "a.png"), "--prompt", "x", "--output", str(out), "--model", str(folder)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        err.startswith(
            f"uniref edit: --model: cannot load the pipeline, its files do not fit together: "
            f"{folder / 'transformer' / WEIGHTS}: tensor "
        )
        and "is missing" in err
    )
    assert not out.exists()


def test_qwen_prompt_encoder_never_opens_bin_files(tmp_path):
    """A folder with only a pytorch_model.bin (a loadable one: the point is that it is never opened)."""
    transformers = pytest.importorskip("transformers")
    text = dict(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default"},
        vocab_size=64,
    )
    config = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        vocab_size=64,
    )
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    folder = tmp_path / "text_encoder" / QwenVLPromptEncoder._model_folder
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"has no \.safetensors weights .* never unpickles \.bin"):
        QwenVLPromptEncoder.from_pretrained(tmp_path / "text_encoder")
