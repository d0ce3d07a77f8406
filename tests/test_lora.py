"""uniref.lora: LoRA files in diffusers, PEFT and kohya/ComfyUI formats (bitwise round trips), adapters on our
transformer, and a LoRA file that diffusers' own Qwen-Image-Edit-Plus pipeline loads to the same latents."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from uniref.lora import (
    LoraError,
    LoraWeights,
    adapter_weights,
    convert_lora,
    inject_lora,
    merge_adapters,
    read_lora,
    write_lora,
)
from uniref.models.transformer import UniRefTransformer2DModel
from uniref.testing.qwen import TINY_TRANSFORMER

TINY = TINY_TRANSFORMER


def random_lora(model, seed=0, modules=None) -> LoraWeights:
    """Random A and B on some Linear modules, with a different rank and alpha per module."""
    g = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = modules or [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.add_k_proj",
        "transformer_blocks.0.img_mlp.net.2",
        "transformer_blocks.1.txt_mod.1",
        "img_in",
        "proj_out",
    ]
    out = {}
    for i, name in enumerate(names):
        m, r = linears[name], 2 + i % 3
        a, b = torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g)
        out[name] = (a * 0.3, b * 0.3, float(r * (1 + i % 2)))
    return LoraWeights(out)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UniRefTransformer2DModel(**TINY, attention_backend="cpu").eval()


def test_kohya_to_diffusers_to_kohya_is_bitwise(model, tmp_path):
    write_lora(random_lora(model), tmp_path / "k", "kohya")
    convert_lora(tmp_path / "k", tmp_path / "d", "diffusers")
    convert_lora(tmp_path / "d", tmp_path / "p", "peft")
    convert_lora(tmp_path / "p", tmp_path / "k2", "kohya")
    first = load_file(tmp_path / "k" / "lora_kohya.safetensors")
    again = load_file(tmp_path / "k2" / "lora_kohya.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert "lora_unet_transformer_blocks_1_attn_add_k_proj.lora_down.weight" in first
    assert "lora_unet_transformer_blocks_0_img_mlp_net_2.alpha" in first


@pytest.mark.parametrize("fmt", ["diffusers", "peft", "kohya"])
def test_every_format_reads_back_what_was_written(model, tmp_path, fmt):
    weights = random_lora(model)
    write_lora(weights, tmp_path, fmt)
    back, detected = read_lora(tmp_path)
    assert detected == fmt and back.modules.keys() == weights.modules.keys()
    for name, (a, b, alpha) in weights.modules.items():
        a2, b2, alpha2 = back.modules[name]
        assert torch.equal(a, a2) and torch.equal(b, b2) and alpha == alpha2, name


def test_adapters_on_the_model_add_alpha_over_r_times_b_a(model, tmp_path):
    weights = random_lora(model)
    base = copy.deepcopy(model)
    inject_lora(model, weights)
    got = adapter_weights(model)
    assert all(
        torch.equal(got.modules[n][0], a) and got.modules[n][2] == alpha for n, (a, _, alpha) in weights.modules.items()
    )
    merge_adapters(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    for name, (a, b, alpha) in weights.modules.items():
        w0 = base.get_submodule(name).weight
        w1 = model.get_submodule(name).weight
        torch.testing.assert_close(w1 - w0, (alpha / a.shape[0]) * b @ a, rtol=1e-5, atol=1e-6)


def test_loading_a_lora_file_that_does_not_fit_is_refused(model, tmp_path):
    write_lora(random_lora(model, modules=["img_in"]), tmp_path / "ok", "diffusers")
    tensors = load_file(tmp_path / "ok" / "pytorch_lora_weights.safetensors")
    renamed = {k.replace("img_in", "img_out_of_nowhere"): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "ok" / "pytorch_lora_weights.safetensors")
    with pytest.raises(LoraError, match=r"does not have, e\.g\. \['img_out_of_nowhere'\]"):
        model.load_lora(tmp_path / "ok")
    small = UniRefTransformer2DModel(**{**TINY, "in_channels": 8})
    write_lora(random_lora(small, modules=["img_in"]), tmp_path / "small", "kohya")
    with pytest.raises(LoraError, match=r"img_in: A \(2, 8\) / B \(32, 2\) do not fit its weight \(32, 16\)"):
        model.load_lora(tmp_path / "small")
    save_file({"unet.down.weight": torch.zeros(2, 2)}, tmp_path / "bad.safetensors")
    with pytest.raises(LoraError, match="keys of no known LoRA format"):
        read_lora(tmp_path / "bad.safetensors")
    (tmp_path / "torn.safetensors").write_bytes(b"\x08not a header")
    with pytest.raises(LoraError, match="torn.safetensors is not a readable safetensors file"):
        read_lora(tmp_path / "torn.safetensors")
    stem = "lora_unet_transformer_blocks_0_attn_to_zz"
    save_file(
        {f"{stem}.lora_down.weight": torch.zeros(2, 2), f"{stem}.lora_up.weight": torch.zeros(2, 2)},
        tmp_path / "k.safetensors",
    )
    with pytest.raises(LoraError, match="no module of the Qwen-Image transformer"):
        read_lora(tmp_path / "k.safetensors")


def test_diffusers_pipeline_loads_our_lora_to_the_same_latents(tmp_path, monkeypatch):
    """diffusers' `QwenImageEditPlusPipeline.load_lora_weights` of our file and our pipeline with the same
    adapter merged give the same latents (fp32, tiny random models)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qwen_module

    import uniref
    from uniref.pipelines import UniRefEditPipeline
    from uniref.testing.qwen import tiny_qwen_edit_plus

    # diffusers sizes references at ~1024^2 (its VAE_IMAGE_SIZE); ours runs per image at the same 64^2
    monkeypatch.setattr(qwen_module, "VAE_IMAGE_SIZE", 64 * 64)
    refs = [PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))]
    common = dict(
        prompt="make it red",
        negative_prompt="",
        true_cfg_scale=1.0,
        num_inference_steps=3,
        output_type="latent",
        height=64,
        width=64,
    )

    def ours_tokens(pipe):
        pipe.set_progress_bar_config(disable=True)
        latent = pipe(
            refs, pixel_budget=64 * 64, budget_mode="per_image", generator=torch.Generator().manual_seed(1), **common
        ).images[0]
        return uniref.pack_latents([[latent]]).tokens

    qwen = tiny_qwen_edit_plus()
    ours = UniRefEditPipeline.from_qwenimage_edit(copy.deepcopy(qwen), target_pixels=64 * 64, attention_backend="cpu")
    file = write_lora(random_lora(ours.transformer, seed=3), tmp_path / "lora", "diffusers")
    qwen.load_lora_weights(str(file.parent))
    ours.load_lora(file, merge=True)
    expected = torch.as_tensor(qwen(image=refs, generator=torch.Generator().manual_seed(1), **common).images[0])
    assert (ours_tokens(ours) - expected).abs().max() <= 1e-4 * expected.abs().max()
    plain = UniRefEditPipeline.from_qwenimage_edit(tiny_qwen_edit_plus(), target_pixels=64 * 64)
    assert (ours_tokens(plain) - expected).abs().max() > 1e-3  # the LoRA changed the output


def test_lora_convert_command(model, tmp_path):
    import subprocess
    import sys

    write_lora(random_lora(model), tmp_path / "k", "kohya")
    cmd = [sys.executable, "-m", "uniref.cli", "lora", "convert"]
    done = subprocess.run(
        cmd + [str(tmp_path / "k"), str(tmp_path / "d"), "--to", "diffusers"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and (tmp_path / "d" / "pytorch_lora_weights.safetensors").is_file()
    assert read_lora(tmp_path / "d")[1] == "diffusers"
    bad = subprocess.run(
        cmd + [str(tmp_path / "none"), str(tmp_path / "x"), "--to", "kohya"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("uniref lora convert: ") and "Traceback" not in bad.stderr
