"""In-process reward sources with tiny random transformers models built offline from configs."""

import pytest
import torch
from PIL import Image

from uniref import rewards

pytest.importorskip("transformers")

# Qwen2-VL's chat layout, reduced to what the judge sends (one user turn of images then text).
_QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """A tiny random Qwen2.5-VL saved as a local folder, and its processor (built here: AutoProcessor needs
    torchvision for Qwen's video processor)."""
    from uniref.testing.qwen import tiny_qwen_edit_plus

    pipe = tiny_qwen_edit_plus()
    folder = tmp_path_factory.mktemp("judge")
    pipe.text_encoder.save_pretrained(folder)
    processor = pipe.processor
    processor.chat_template = _QWEN_CHAT
    return str(folder), processor


def _batch(n=3, refs=2, size=24):
    g = torch.Generator().manual_seed(1)
    records = [
        rewards.Record(
            f"combine the {refs} subjects ({i})",
            [Image.new("RGB", (size, size), (30 * i, 60 * j, 120)) for j in range(refs)],
        )
        for i in range(n)
    ]
    return records, torch.rand(n, 3, size, size, generator=g)


def test_local_judge_yesno_shapes_batching_determinism(qwen_folder):
    folder, processor = qwen_folder
    records, images = _batch()
    one = rewards.load("vlm_judge_local", path=folder, processor=processor, batch_size=1)
    assert one.names == ("instruction", "consistency_mean", "consistency_min", "quality")
    a = one(records, images)
    assert a.shape == (3, 4) and ((a > 0) & (a < 1)).all()
    b = rewards.load("vlm_judge_local", path=folder, processor=processor, batch_size=5)(records, images)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # left padding changes nothing
    assert torch.equal(one(records, images), a)
    assert (a[:, 1] >= a[:, 2]).all()


def test_local_judge_score_mode_garbage_is_an_error(qwen_folder):
    folder, processor = qwen_folder
    judge = rewards.load(
        "vlm_judge_local", path=folder, processor=processor, mode="score", axes=["quality"], max_new_tokens=4
    )
    with pytest.raises(rewards.JudgeError, match="gave no valid judgement"):
        judge(*_batch(n=1))


def test_local_judge_needs_a_folder():
    with pytest.raises(ValueError, match="path"):
        rewards.load("vlm_judge_local")


def _siglip_folder(folder):
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # a byte-level tokenizer (SigLIP's sentencepiece vocabulary cannot be downloaded here)
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update({"<pad>": 256, "</s>": 257})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    T.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>").save_pretrained(folder)
    cfg = T.SiglipConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 258,
            "max_position_embeddings": 16,
            "bos_token_id": None,
            "eos_token_id": None,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
    )
    torch.manual_seed(0)
    T.SiglipModel(cfg).save_pretrained(folder)
    T.SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def _dinov2_folder(folder):
    import transformers as T

    torch.manual_seed(0)
    T.Dinov2Model(
        T.Dinov2Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(folder)
    T.BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["siglip", "dinov2"])
def embedder(request, tmp_path_factory):
    build = _siglip_folder if request.param == "siglip" else _dinov2_folder
    return build(tmp_path_factory.mktemp(request.param))


def test_similarity_shapes_batching_determinism(embedder):
    records, images = _batch(n=3, refs=3, size=32)
    records[1].references = records[1].references[:1]  # reference counts may differ per record
    a = rewards.load("similarity", path=embedder, batch_size=1)
    assert a.names == ("similarity_mean", "similarity_min")
    out = a(records, images)
    assert out.shape == (3, 2) and (out[:, 0] >= out[:, 1] - 1e-6).all() and (out.abs() <= 1 + 1e-5).all()
    b = rewards.load("similarity", path=embedder, batch_size=16)(records, images)
    torch.testing.assert_close(out, b, atol=1e-5, rtol=0)
    assert torch.equal(a(records, images), out)


def test_similarity_of_an_output_to_itself_is_one(embedder):
    size = 32
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, size, size, generator=g)
    from uniref.rewards.records import to_pil

    records = [rewards.Record("keep it", [to_pil(images[i], "x")]) for i in range(2)]
    out = rewards.load("similarity", path=embedder)(records, images)
    torch.testing.assert_close(out, torch.ones(2, 2), atol=1e-4, rtol=0)


def test_similarity_margin_is_dyrefs(embedder):
    from uniref.rewards.similarity import margin

    records, images = _batch(n=2, refs=4, size=32)
    raw = rewards.load("similarity", path=embedder)
    sq = rewards.load("similarity", path=embedder, use_margin=True)
    sims = (raw.embed([rewards.records.to_pil(images[0], "x")] * 4) * raw.embed(records[0].references)).sum(-1)
    k = 10 + 3 * (4 - 2)
    expected = torch.sigmoid(k * (sims - 0.65))
    out = sq(records, images)
    torch.testing.assert_close(out[0], torch.stack([expected.mean(), expected.min()]), atol=1e-5, rtol=0)
    assert float(margin(torch.tensor(0.65), 7)) == 0.5
    assert float(margin(torch.tensor(0.75), 2)) == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())


def test_similarity_on_a_crop(embedder):
    records, images = _batch(n=1, refs=2, size=32)
    src = rewards.load("similarity", path=embedder)
    whole = src(records, images)
    records[0].metadata["crop"] = (0, 0, 16, 16)
    cropped = src(records, images)
    crop = rewards.records.to_pil(images[0], "x").crop((0, 0, 16, 16))
    sims = (src.embed([crop, crop]) * src.embed(records[0].references)).sum(-1)
    torch.testing.assert_close(cropped[0], torch.stack([sims.mean(), sims.min()]), atol=1e-5, rtol=0)
    assert not torch.equal(whole, cropped)
    records[0].metadata["crop"] = [(0, 0, 16, 16), (16, 16, 32, 32)]  # one box per reference
    assert src(records, images).shape == (1, 2)
    records[0].metadata["crop"] = (0, 0, 64, 16)
    with pytest.raises(ValueError, match=r"records\[0\].metadata\['crop'\] box .* not inside the 32x32 output"):
        src(records, images)


def test_benchmark_runner_with_the_local_judge_names_it_on_garbage(qwen_folder, tmp_path):
    from uniref.rewards.benchmarks import run_benchmark

    folder, processor = qwen_folder
    (tmp_path / "data/object_2").mkdir(parents=True)
    (tmp_path / "data/object_2/000_prompt.txt").write_text("put both on a desk")
    for i in (1, 2):
        Image.new("RGB", (24, 24), (90 * i, 0, 0)).save(tmp_path / f"data/object_2/000_{i}.png")
    judge = rewards.load("vlm_judge_local", path=folder, processor=processor, max_new_tokens=4)
    with pytest.raises(rewards.JudgeError, match=f"vlm_judge_local: {folder} gave no valid judgement"):
        run_benchmark("multibanana", tmp_path / "data", lambda p, refs: refs[0], judge, tmp_path / "run")
    assert (tmp_path / "run/images/object_2/000_generated.png").is_file()


def test_similarity_text_alignment(embedder):
    records, images = _batch(n=3, refs=2, size=32)
    if "dinov2" in embedder:
        with pytest.raises(ValueError, match="text tower"):
            rewards.load("similarity", path=embedder, text=True)
        return
    src = rewards.load("similarity", path=embedder, text=True, max_text_length=16, batch_size=2)
    assert src.names == ("similarity_mean", "similarity_min", "text_alignment")
    out = src(records, images)
    assert out.shape == (3, 3)
    torch.testing.assert_close(out[:, :2], rewards.load("similarity", path=embedder)(records, images))
    pil = [rewards.records.to_pil(im, "x") for im in images]
    expected = (src.embed(pil) * src.embed_text([r.prompt for r in records])).sum(-1)
    torch.testing.assert_close(out[:, 2], expected, atol=1e-5, rtol=0)
