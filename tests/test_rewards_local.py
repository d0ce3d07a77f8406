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
    records = [rewards.Record(f"combine the {refs} subjects ({i})",
                              [Image.new("RGB", (size, size), (30 * i, 60 * j, 120)) for j in range(refs)])
               for i in range(n)]
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
    judge = rewards.load("vlm_judge_local", path=folder, processor=processor, mode="score", axes=["quality"],
                         max_new_tokens=4)
    with pytest.raises(rewards.JudgeError, match="gave no valid judgement"):
        judge(*_batch(n=1))


def test_local_judge_needs_a_folder():
    with pytest.raises(ValueError, match="path"):
        rewards.load("vlm_judge_local")
