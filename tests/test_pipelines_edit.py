"""UniRefEditPipeline: packed batches equal one-by-one runs, budgets, guidance, outputs, errors, save/load,
and the Qwen-Image-Edit-Plus path against diffusers' own pipeline (tiny random models, CPU)."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

import uniref
import uniref.synthetic
from uniref.pipelines import ByteTextEncoder, DefaultModelUnavailableError, UniRefEditPipeline
from uniref.presets import random_edit_pipeline


def random_image(rng, h, w):
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe():
    pipe = random_edit_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def samples():
    """Four samples with 1, 2, 3 and 4 references of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    sizes = [[(48, 64)], [(64, 32), (32, 32)], [(40, 40), (80, 48), (16, 64)], [(64, 64), (24, 40), (56, 32), (32, 96)]]
    images = [[random_image(rng, h, w) for h, w in s] for s in sizes]
    prompts = ["make it red", "put the cat on the sofa", "compose all three ✓", ""]
    return images, prompts


class Spy:
    """Records the packed layout and the text lengths of every transformer forward."""

    def __init__(self, model):
        self.calls = []
        # forward(hidden_states, encoder_hidden_states, timestep, layout, text_lengths)
        self.handle = model.register_forward_pre_hook(lambda m, args: self.calls.append((args[3], list(args[4]))))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_packed_batch_equals_one_by_one(pipe, samples):
    images, prompts = samples
    kwargs = dict(num_inference_steps=3, true_cfg_scale=3.0, negative_prompt="blurry", output_type="np")
    with Spy(pipe.transformer) as spy:
        generators = [torch.Generator().manual_seed(10 + i) for i in range(4)]
        batch = pipe(images, prompts, generator=generators, **kwargs).images
    assert len(spy.calls) == 3  # one forward per step for 4 samples x 2 guidance branches
    assert spy.calls[0][0].batch_size == 8
    for i, (refs, prompt) in enumerate(zip(images, prompts)):
        single = pipe(refs, prompt, generator=torch.Generator().manual_seed(10 + i), **kwargs).images[0]
        assert single.shape == batch[i].shape
        assert np.abs(single - batch[i]).max() < 1e-4, i
    # default output size: the first reference's aspect ratio at target_pixels (64^2), sides multiples of 16
    assert [b.shape[:2] for b in batch] == [(48, 80), (96, 48), (64, 64), (64, 64)]


def test_one_generator_is_drawn_in_sample_order(pipe, samples):
    images, prompts = samples
    kwargs = dict(num_inference_steps=2, true_cfg_scale=1.0, output_type="latent")
    batch = pipe(images[:2], prompts[:2], generator=torch.Generator().manual_seed(3), **kwargs).images
    g = torch.Generator().manual_seed(3)
    singles = [pipe(images[i], prompts[i], generator=g, **kwargs).images[0] for i in range(2)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(batch, singles))


@pytest.mark.parametrize("mode", ["global", "per_image"])
def test_budget_modes_set_reference_tokens(pipe, mode):
    rng = np.random.default_rng(1)
    budget = 64 * 64
    refs = [random_image(rng, 64, 64) for _ in range(4)]
    tokens = []
    for k in (1, 2, 4):
        with Spy(pipe.transformer) as spy:
            pipe(
                refs[:k],
                "x",
                num_inference_steps=2,
                true_cfg_scale=1.0,
                pixel_budget=budget,
                budget_mode=mode,
                height=32,
                width=32,
                output_type="latent",
            )
        layout = spy.calls[0][0]
        target, *ref_counts = layout.image_tokens(0)
        assert target == 4  # 32x32 pixels -> 4x4 latent -> 2x2 tokens
        tokens.append(sum(ref_counts))
    if mode == "global":
        # SELF: the references share 64^2 pixels = at most 16 tokens whatever their number. Two references
        # would be ~45^2 each; sides are multiples of 16 and 48^2 x 2 overflows, so they get 32^2.
        assert tokens == [16, 8, 16]
    else:  # each reference gets 64^2 pixels: linear growth
        assert tokens == [16, 32, 64]


def test_guidance_runs_both_branches_in_one_forward(pipe, samples):
    images, prompts = samples

    def run(**kw):
        return pipe(
            images[1],
            prompts[1],
            num_inference_steps=2,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **kw,
        ).images[0]

    with Spy(pipe.transformer) as spy:
        guided = run(true_cfg_scale=4.0, negative_prompt="ugly")
    layout, text_lengths = spy.calls[0]
    assert layout.batch_size == 2 and text_lengths == [len(prompts[1].encode()) + 1, len("ugly") + 1]
    unguided = run(true_cfg_scale=1.0)
    other_negative = run(true_cfg_scale=4.0, negative_prompt="")
    assert not torch.allclose(guided, unguided) and not torch.allclose(guided, other_negative)


def test_output_types(pipe, samples):
    images, prompts = samples
    outs = {
        t: pipe(
            images[0], prompts[0], num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type=t
        ).images[0]
        for t in ("pil", "np", "pt", "latent")
    }
    assert isinstance(outs["pil"], PIL.Image.Image) and outs["pil"].size == (80, 48)
    assert outs["np"].shape == (48, 80, 3) and outs["np"].dtype == np.float32
    assert outs["pt"].shape == (3, 48, 80) and 0 <= outs["pt"].min() and outs["pt"].max() <= 1
    assert outs["latent"].shape == (4, 6, 10)
    np.testing.assert_allclose(outs["pt"].permute(1, 2, 0).numpy(), outs["np"], atol=1e-6)
    assert np.abs(np.asarray(outs["pil"]).astype(int) - (outs["np"] * 255).round()).max() <= 1
    # the latent output decodes to the same image
    with torch.no_grad():
        decoded = pipe.image_processor.postprocess(pipe.decode_latents(outs["latent"]), output_type="np")[0]
    np.testing.assert_allclose(decoded, outs["np"], atol=1e-5)
    tup = pipe(images[0], prompts[0], num_inference_steps=2, output_type="latent", return_dict=False)
    assert isinstance(tup, tuple) and len(tup[0]) == 1


def test_array_and_tensor_references(pipe):
    """A uint8 array, a float array and a float tensor of the same picture give the same edit."""
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    kw = dict(num_inference_steps=2, output_type="latent", height=32, width=32, pixel_budget=32 * 48)
    outs = [
        pipe([img], "x", generator=torch.Generator().manual_seed(0), **kw).images[0]
        for img in (PIL.Image.fromarray(arr), arr, arr / 255.0, torch.from_numpy(arr).permute(2, 0, 1) / 255.0)
    ]
    assert all(torch.allclose(outs[0], o, atol=1e-5) for o in outs[1:])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(images=[]), "images must be a non-empty list"),
        (dict(images=[[PIL.Image.new("RGB", (32, 32))]]), "images is a list of lists .* pass one prompt per sample"),
        (dict(prompt=["a", "b"]), "for a batch of 2 prompts, images must be a list of 2 lists"),
        (dict(prompt=3), "prompt must be a str"),
        (dict(images=["cat.png"]), r"images\[0\]\[0\] is a str; expected a PIL"),
        (dict(images=[torch.zeros(4, 8, 8)]), r"images\[0\]\[0\]: a tensor image must be float \(3, H, W\)"),
        (dict(images=[torch.full((3, 8, 8), -1.0)]), r"must lie in \[0, 1\]; rescale"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt must be None, a str .* list of 1 str"),
        (dict(num_inference_steps=0), "num_inference_steps must be an int >= 1"),
        (dict(num_inference_steps=1), r"num_inference_steps=1 gives no valid schedule .*0.02\); use more steps"),
        (dict(true_cfg_scale=0.5), r"true_cfg_scale must be a number >= 1 \(1 disables guidance\)"),
        (dict(budget_mode="sum"), "budget_mode must be one of"),
        (dict(pixel_budget=1.5e4), "pixel_budget must be a positive int"),
        (dict(pixel_budget=300, images=[PIL.Image.new("RGB", (32, 32))] * 2), "too small for 2 reference"),
        (dict(height=64), "pass both height and width, or neither"),
        (dict(height=60, width=64), r"height=60 must be a positive multiple of 16 \(e.g. 48\)"),
        (dict(output_type="jpg"), "output_type must be one of"),
        (dict(generator=[torch.Generator()] * 2), "list of 2 generators for 1 samples; pass one per sample"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(pipe, change, match):
    kwargs = dict(images=[PIL.Image.new("RGB", (32, 32))], prompt="x", num_inference_steps=2)
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_mismatched_components_are_rejected():
    pipe = random_edit_pipeline("tiny")
    with pytest.raises(ValueError, match="embed_dim=16 must equal transformer.config.joint_attention_dim=32"):
        UniRefEditPipeline(pipe.transformer, pipe.vae, pipe.scheduler, ByteTextEncoder(embed_dim=16, hidden_dim=16))
    small = random_edit_pipeline("small")
    with pytest.raises(ValueError, match="16 latent channels, so image tokens have 64 features"):
        UniRefEditPipeline(pipe.transformer, small.vae, pipe.scheduler, pipe.text_encoder)
    with pytest.raises(ValueError, match="lacks encode_prompts"):
        UniRefEditPipeline(pipe.transformer, pipe.vae, pipe.scheduler, torch.nn.Linear(2, 2))


def test_save_and_load_round_trip(pipe, samples, tmp_path):
    images, prompts = samples
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "UniRefEditPipeline" and index["target_pixels"] == 64 * 64
    assert index["text_encoder"] == ["uniref.pipelines.text_encoders", "ByteTextEncoder"]
    loaded = UniRefEditPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np", true_cfg_scale=2.0)
    a = pipe(images[:2], prompts[:2], generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw).images
    b = loaded(images[:2], prompts[:2], generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw).images
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_from_pretrained_without_folder_loads_the_embedded_default_model():
    pipe = UniRefEditPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.target_pixels == 64 * 64 and pipe.default_pixel_budget >= 64 * 64
    size = sum(
        p.numel() * p.element_size() for c in (pipe.transformer, pipe.vae, pipe.text_encoder) for p in c.parameters()
    )
    assert size < 50 * 2**20  # tens of MB at most
    task = uniref.synthetic.sample_task(3, "compose", 3, 64, "test")
    out = pipe(
        task.images, task.prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images[0]
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()


def test_from_pretrained_without_folder_or_default_model(monkeypatch, tmp_path):
    import uniref.pipelines.edit as edit

    monkeypatch.setattr(edit, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    with pytest.raises(DefaultModelUnavailableError, match="default model is not shipped"):
        UniRefEditPipeline.from_pretrained()


def _break_truncate(root):
    f = root / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _break_pickle_only(root):
    f = root / "vae" / "diffusion_pytorch_model.safetensors"
    f.rename(f.with_suffix(".bin"))  # a .bin next to the config: it must not be unpickled


def _break_mismatch(root):
    cfg = json.loads((root / "transformer" / "config.json").read_text())
    cfg["num_attention_heads"] *= 2
    (root / "transformer" / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "model_index.json").unlink(), "no model_index.json"),
        (lambda r: (r / "model_index.json").write_text("{not json"), "model_index.json is corrupt"),
        (lambda r: shutil.rmtree(r / "text_encoder"), "the text_encoder component is missing"),
        (_break_pickle_only, "vae/ has no .safetensors weights"),
        (_break_truncate, "cannot load the pipeline, a file is corrupt"),
        (_break_mismatch, "cannot load the pipeline"),
    ],
    ids=["no-index", "corrupt-index", "missing-component", "pickle-only", "truncated", "mismatched"],
)
def test_loading_a_damaged_folder_is_a_clear_error(tmp_path, damage, message):
    from uniref.pipelines import PipelineLoadError

    random_edit_pipeline("tiny").save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(PipelineLoadError, match=message):
        UniRefEditPipeline.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------
# The Qwen-Image-Edit-Plus path, against diffusers' own pipeline
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_pipes():
    from uniref.testing.qwen import tiny_qwen_edit_plus

    pytest.importorskip("transformers")
    qwen = tiny_qwen_edit_plus()
    ours = UniRefEditPipeline.from_qwenimage_edit(qwen, target_pixels=64 * 64, attention_backend="auto")
    ours.set_progress_bar_config(disable=True)
    return qwen, ours


def test_from_qwenimage_edit_matches_diffusers_pipeline(qwen_pipes, monkeypatch):
    """Same prompts, images, seed and guidance: the same latents and image as QwenImageEditPlusPipeline.

    diffusers resizes every reference to ~1024^2 (its module constant VAE_IMAGE_SIZE); it is lowered to
    64^2 so this runs in seconds, and ours runs in per_image mode at the same budget, which sizes references
    by diffusers' own rule: non-square references plan to the same sizes in both.
    """
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qwen_module

    qwen, ours = qwen_pipes
    monkeypatch.setattr(qwen_module, "VAE_IMAGE_SIZE", 64 * 64)
    rng = np.random.default_rng(0)
    refs = [random_image(rng, 48, 80), random_image(rng, 96, 64)]
    common = dict(prompt="swap them", negative_prompt="blurry", true_cfg_scale=3.0, num_inference_steps=3)
    for output_type in ("latent", "np"):
        expected = qwen(
            image=refs,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(5),
            output_type=output_type,
            **common,
        ).images[0]
        got = ours(
            refs,
            pixel_budget=64 * 64,
            budget_mode="per_image",
            generator=torch.Generator().manual_seed(5),
            height=64,
            width=64,
            output_type=output_type,
            **common,
        ).images[0]
        if output_type == "latent":  # diffusers returns packed target tokens; ours the (C, h, w) latent
            got = uniref.pack_latents([[got]]).tokens
        expected = torch.as_tensor(expected)
        assert got.shape == expected.shape
        assert (torch.as_tensor(got) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_qwen_path_save_and_load(qwen_pipes, tmp_path, monkeypatch):
    """Our part of the round trip: model_index, the converted transformer, the VAE, the scheduler and
    the Qwen2.5-VL weights. The processor's own (transformers) save/load is stubbed: this environment
    has no torchvision, without which transformers cannot save or load a complete Qwen2VLProcessor."""
    import transformers

    _, ours = qwen_pipes
    processor = ours.text_encoder.processor
    monkeypatch.setattr(type(processor), "save_pretrained", lambda self, path, **kw: None)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", staticmethod(lambda path, **kw: processor))
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "text_encoder" / "model" / "config.json").is_file()
    loaded = UniRefEditPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    refs = [PIL.Image.new("RGB", (48, 32), (10, 200, 90))]
    kw = dict(num_inference_steps=2, true_cfg_scale=2.0, output_type="latent")
    a = ours(refs, "greener", generator=torch.Generator().manual_seed(0), **kw).images[0]
    b = loaded(refs, "greener", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert torch.equal(a, b)
